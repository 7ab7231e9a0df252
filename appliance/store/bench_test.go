package store

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/objref"
)

const (
	benchObjectSize = 4 << 20
	benchObjects    = 48
	benchWriters    = 8
)

func benchObjectsData(b *testing.B) [][]byte {
	b.Helper()
	objs := make([][]byte, benchObjects)
	for i := range objs {
		objs[i] = make([]byte, benchObjectSize)
		rand.Read(objs[i])
	}
	return objs
}

// parallel runs fn over the objects with benchWriters goroutines.
func parallel(objs [][]byte, fn func(i int, data []byte) error) error {
	var wg sync.WaitGroup
	errs := make(chan error, benchWriters)
	next := make(chan int)
	for w := 0; w < benchWriters; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				if err := fn(i, objs[i]); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	for i := range objs {
		next <- i
	}
	close(next)
	wg.Wait()
	close(errs)
	return <-errs
}

// plainWrite is the baseline: write and fsync one file with plain os calls.
func plainWrite(dir string, i int, data []byte) error {
	f, err := os.Create(filepath.Join(dir, fmt.Sprint(i)))
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// benchRounds is how many paired baseline/store rounds one benchmark
// iteration runs; the median ratio is reported, as single rounds on a shared
// machine are noisy.
const benchRounds = 5

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// BenchmarkPut: 4 MiB objects into a 2-disk mirror with 8 writers, against
// the same bytes written with fsync to one directory with plain os calls,
// in alternating rounds of the same run.
func BenchmarkPut(b *testing.B) {
	objs := benchObjectsData(b)
	total := float64(benchObjects*benchObjectSize) / (1 << 20)
	names := make([]string, len(objs)) // object names come with the request
	for i, d := range objs {
		names[i] = objref.Digest(d)
	}
	var ratios, storeRates, plainRates []float64
	for n := 0; n < b.N; n++ {
		for r := 0; r < benchRounds; r++ {
			plainDir := b.TempDir()
			start := time.Now()
			if err := parallel(objs, func(i int, d []byte) error { return plainWrite(plainDir, i, d) }); err != nil {
				b.Fatal(err)
			}
			plain := total / time.Since(start).Seconds()

			s, _ := newStore(b, 2)
			start = time.Now()
			if err := parallel(objs, func(i int, d []byte) error {
				_, err := s.Put(ns, names[i], d)
				return err
			}); err != nil {
				b.Fatal(err)
			}
			store := total / time.Since(start).Seconds()
			storeRates, plainRates, ratios = append(storeRates, store), append(plainRates, plain), append(ratios, store/plain)
		}
	}
	b.ReportMetric(median(storeRates), "store-MiB/s")
	b.ReportMetric(median(plainRates), "plain-MiB/s")
	b.ReportMetric(median(ratios), "ratio")
	fmt.Printf("put 4 MiB x %d, %d writers, median of %d rounds: store (2 disks) %.0f MiB/s, plain fsync (1 dir) %.0f MiB/s, ratio %.2f (target >= 0.45)\n",
		benchObjects, benchWriters, len(ratios), median(storeRates), median(plainRates), median(ratios))
}

// BenchmarkResync: resync of a replacement disk against `cp -r` of the same
// tree followed by `sync`, in alternating rounds; the median ratio counts.
func BenchmarkResync(b *testing.B) {
	objs := benchObjectsData(b)
	total := float64(benchObjects*benchObjectSize) / (1 << 20)
	var ratios, resyncRates, cpRates []float64
	for n := 0; n < b.N; n++ {
		for r := 0; r < benchRounds; r++ {
			s, roots := newStore(b, 1)
			for _, d := range objs {
				if _, err := s.Put(ns, objref.Digest(d), d); err != nil {
					b.Fatal(err)
				}
			}
			exec.Command("sync").Run()
			dst := filepath.Join(b.TempDir(), "copy")
			start := time.Now()
			if out, err := exec.Command("cp", "-r", roots[0], dst).CombinedOutput(); err != nil {
				b.Fatalf("cp: %v %s", err, out)
			}
			if err := exec.Command("sync").Run(); err != nil {
				b.Fatal(err)
			}
			cp := total / time.Since(start).Seconds()

			if err := s.AddDisk(DiskSpec{ID: "new", Root: filepath.Join(b.TempDir(), "new")}); err != nil {
				b.Fatal(err)
			}
			start = time.Now()
			if _, err := s.Resync(context.Background(), "new", nil); err != nil {
				b.Fatal(err)
			}
			rs := total / time.Since(start).Seconds()
			ratios, resyncRates, cpRates = append(ratios, rs/cp), append(resyncRates, rs), append(cpRates, cp)
		}
	}
	b.ReportMetric(median(resyncRates), "resync-MiB/s")
	b.ReportMetric(median(cpRates), "cp-sync-MiB/s")
	b.ReportMetric(median(ratios), "ratio")
	fmt.Printf("resync %.0f MiB, median of %d rounds: store %.0f MiB/s, cp -r + sync %.0f MiB/s, ratio %.2f (target >= 0.7)\n",
		total, len(ratios), median(resyncRates), median(cpRates), median(ratios))
}

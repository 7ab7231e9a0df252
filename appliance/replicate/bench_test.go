package replicate

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/store"
	"github.com/dataembassy/embassy/protocol/api"
)

// timedStore records when each object arrived.
type timedStore struct {
	Store
	mu      sync.Mutex
	arrived map[string]time.Time
}

func (s *timedStore) Put(ns, name string, data []byte) ([]string, error) {
	d, err := s.Store.Put(ns, name, data)
	s.mu.Lock()
	s.arrived[name] = time.Now()
	s.mu.Unlock()
	return d, err
}

func (s *timedStore) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.arrived)
}

// objects makes n distinct 4 MiB objects.
func objects(n int) (names []string, datas [][]byte) {
	for i := 0; i < n; i++ {
		d := bytes.Repeat([]byte{byte(i), byte(i >> 8), 0x5a, 0xa5}, 1<<20)
		sum := sha256.Sum256(d)
		names = append(names, hex.EncodeToString(sum[:]))
		datas = append(datas, d)
	}
	return names, datas
}

func percentile(ds []time.Duration, p float64) time.Duration {
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	return ds[int(float64(len(ds)-1)*p)]
}

// BenchmarkReplicationLag: steady ingest of 4 MiB objects into A (each
// stored on A's two disks, then queued); lag is from A's acknowledgement
// to the object being durable on B's two disks.
func BenchmarkReplicationLag(b *testing.B) {
	p := newPKI(b)
	a := newNode(b, p, strings.Repeat("a", 32), Options{AntiEntropyEvery: time.Hour})
	peer := newNode(b, p, strings.Repeat("b", 32), Options{AntiEntropyEvery: time.Hour})
	ts := &timedStore{Store: peer.store, arrived: map[string]time.Time{}}
	peer.srv.Store = ts
	a.rep.SetPeers([]api.Peer{{ID: peer.id, Endpoints: []string{peer.addr}}})
	peer.rep.SetPeers([]api.Peer{{ID: a.id, Endpoints: []string{a.addr}}})
	const n = 64
	names, datas := objects(n)
	acked := map[string]time.Time{}
	for i := range names {
		if _, err := a.store.Put("reg/data", names[i], datas[i]); err != nil {
			b.Fatal(err)
		}
		acked[names[i]] = time.Now()
		a.rep.Stored("reg/data", names[i], int64(len(datas[i])))
		time.Sleep(20 * time.Millisecond) // steady, not a burst
	}
	waitFor(b, "all objects on the peer", 5*time.Minute, func() bool { return ts.count() == n })
	var lags []time.Duration
	for name, t := range acked {
		lags = append(lags, ts.arrived[name].Sub(t))
	}
	b.ReportMetric(float64(percentile(lags, 0.5).Milliseconds()), "p50-lag-ms")
	b.ReportMetric(float64(percentile(lags, 0.99).Milliseconds()), "p99-lag-ms")
	fmt.Printf("replication lag, %d x 4 MiB objects at steady ingest: p50 %v, p99 %v\n", n, percentile(lags, 0.5), percentile(lags, 0.99))
}

// BenchmarkCatchUp: a 1 GiB backlog on A reaches a peer that just came
// back, against the same objects copied with plain HTTPS PUTs (the same
// two concurrent streams, TLS and a mirrored store on the receiving side)
// in the same run.
func BenchmarkCatchUp(b *testing.B) {
	const n = 256 // x 4 MiB = 1 GiB
	names, datas := objects(n)
	p := newPKI(b)
	a := newNode(b, p, strings.Repeat("a", 32), Options{AntiEntropyEvery: time.Hour})
	for i := range names {
		if _, err := a.store.Put("reg/data", names[i], datas[i]); err != nil {
			b.Fatal(err)
		}
	}
	datas = nil
	var ratios []float64
	for round := 0; round < 3; round++ {
		base := plainPuts(b, a.store, names)
		peer := newNode(b, p, fmt.Sprintf("%032d", round), Options{AntiEntropyEvery: time.Hour})
		ts := &timedStore{Store: peer.store, arrived: map[string]time.Time{}}
		peer.srv.Store = ts
		peer.rep.SetPeers([]api.Peer{{ID: a.id}})
		start := time.Now()
		a.rep.SetPeers([]api.Peer{{ID: peer.id, Endpoints: []string{peer.addr}}})
		waitFor(b, "catch-up", 10*time.Minute, func() bool { return ts.count() == n })
		ours := time.Since(start)
		a.rep.SetPeers(nil)
		r := base.Seconds() / ours.Seconds()
		ratios = append(ratios, r)
		fmt.Printf("catch-up of 1 GiB: replication %.1fs (%.0f MiB/s), plain HTTPS PUTs %.1fs (%.0f MiB/s), ratio %.2f\n",
			ours.Seconds(), 1024/ours.Seconds(), base.Seconds(), 1024/base.Seconds(), r)
	}
	sort.Float64s(ratios)
	fmt.Printf("catch-up ratio, median of %d: %.2f (target >= 0.6)\n", len(ratios), ratios[len(ratios)/2])
	b.ReportMetric(ratios[len(ratios)/2], "ratio")
}

// plainPuts copies the objects with two concurrent HTTPS PUT streams to a
// handler that stores them in a fresh mirrored store, and returns the time.
func plainPuts(b *testing.B, src *store.Store, names []string) time.Duration {
	dir := b.TempDir()
	dst, err := store.Open(quiet(), []store.DiskSpec{{ID: "d1", Root: filepath.Join(dir, "d1")}, {ID: "d2", Root: filepath.Join(dir, "d2")}})
	if err != nil {
		b.Fatal(err)
	}
	cert := newPKI(b).attested(b, strings.Repeat("c", 32))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var buf bytes.Buffer
		buf.ReadFrom(r.Body)
		if _, err := dst.Put("reg/data", r.URL.Query().Get("name"), buf.Bytes()); err != nil {
			http.Error(w, err.Error(), 500)
		}
	}), TLSConfig: &tls.Config{Certificates: []tls.Certificate{*cert}}}
	go hs.ServeTLS(ln, "", "")
	defer hs.Close()
	cl := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, MaxIdleConnsPerHost: 2}}
	start := time.Now()
	work := make(chan string)
	var wg sync.WaitGroup
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for name := range work {
				data, err := src.Get("reg/data", name)
				if err != nil {
					b.Error(err)
					continue
				}
				req, _ := http.NewRequestWithContext(context.Background(), http.MethodPut, "https://"+ln.Addr().String()+"/?name="+name, bytes.NewReader(data))
				resp, err := cl.Do(req)
				if err != nil || resp.StatusCode != 200 {
					b.Errorf("plain put: %v", err)
					continue
				}
				resp.Body.Close()
			}
		}()
	}
	for _, n := range names {
		work <- n
	}
	close(work)
	wg.Wait()
	return time.Since(start)
}

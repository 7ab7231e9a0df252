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

// lagRounds is the number of rounds of BenchmarkReplicationLag; the order
// of replication and baseline alternates from one round to the next.
const lagRounds = 3

// BenchmarkReplicationLag: steady ingest of 4 MiB objects into A (each
// stored on A's two disks, then queued); lag is from A's acknowledgement
// to the object being durable on B's two disks. The baseline, measured in
// the same run, is a direct write of the same objects at the same pace: as
// each is acknowledged, two senders PUT it over plain HTTPS into a handler
// that stores it on two disks, and its lag runs to durable there. Rounds
// alternate which goes first; the ratios of p50 and p99 against the
// baseline are the medians of the rounds.
func BenchmarkReplicationLag(b *testing.B) {
	const n = 64
	names, datas := objects(n)
	p := newPKI(b)
	measure := map[string]func(round int) []time.Duration{
		"replication": func(round int) []time.Duration { return replicationLags(b, p, round, names, datas) },
		"direct":      func(round int) []time.Duration { return directLags(b, round, names, datas) },
	}
	var p50s, p99s, r50s, r99s []float64
	for range b.N {
		for round := 0; round < lagRounds; round++ {
			order := []string{"replication", "direct"}
			if round%2 == 1 {
				order = []string{"direct", "replication"}
			}
			lags := map[string][]time.Duration{}
			for _, k := range order {
				lags[k] = measure[k](round)
			}
			ours50, ours99 := percentile(lags["replication"], 0.5), percentile(lags["replication"], 0.99)
			base50, base99 := percentile(lags["direct"], 0.5), percentile(lags["direct"], 0.99)
			p50s, p99s = append(p50s, float64(ours50.Milliseconds())), append(p99s, float64(ours99.Milliseconds()))
			r50s, r99s = append(r50s, ours50.Seconds()/base50.Seconds()), append(r99s, ours99.Seconds()/base99.Seconds())
			fmt.Printf("round %d (%s first), %d x 4 MiB objects at steady ingest: replication p50 %v p99 %v, direct HTTPS write p50 %v p99 %v, ratio p50 %.2f p99 %.2f\n",
				round+1, order[0], n, ours50, ours99, base50, base99, r50s[len(r50s)-1], r99s[len(r99s)-1])
		}
	}
	b.ReportMetric(medianOf(p50s), "p50-lag-ms")
	b.ReportMetric(medianOf(p99s), "p99-lag-ms")
	b.ReportMetric(medianOf(r50s), "p50-ratio")
	b.ReportMetric(medianOf(r99s), "p99-ratio")
	fmt.Printf("replication lag, median of %d rounds: p50 %.0f ms, p99 %.0f ms; against a direct HTTPS write: p50 ratio %.2f, p99 ratio %.2f\n",
		len(r50s), medianOf(p50s), medianOf(p99s), medianOf(r50s), medianOf(r99s))
}

func medianOf(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// ingestPaced stores the objects in src one by one, 20 ms apart (steady,
// not a burst), and hands each to sent once acknowledged. It returns the
// acknowledgement times.
func ingestPaced(b *testing.B, src *store.Store, names []string, datas [][]byte, sent func(name string, size int64)) map[string]time.Time {
	acked := map[string]time.Time{}
	for i := range names {
		if _, err := src.Put("reg/data", names[i], datas[i]); err != nil {
			b.Fatal(err)
		}
		acked[names[i]] = time.Now()
		sent(names[i], int64(len(datas[i])))
		time.Sleep(20 * time.Millisecond)
	}
	return acked
}

func lagsOf(b *testing.B, acked map[string]time.Time, ts *timedStore) []time.Duration {
	waitFor(b, "all objects on the other side", 5*time.Minute, func() bool { return ts.count() == len(acked) })
	ts.mu.Lock()
	defer ts.mu.Unlock()
	var lags []time.Duration
	for name, t := range acked {
		lags = append(lags, ts.arrived[name].Sub(t))
	}
	return lags
}

// replicationLags ingests into a fresh node A replicating to a fresh peer.
func replicationLags(b *testing.B, p *testPKI, round int, names []string, datas [][]byte) []time.Duration {
	a := newNode(b, p, fmt.Sprintf("a%031d", round), Options{AntiEntropyEvery: time.Hour})
	peer := newNode(b, p, fmt.Sprintf("b%031d", round), Options{AntiEntropyEvery: time.Hour})
	ts := &timedStore{Store: peer.store, arrived: map[string]time.Time{}}
	peer.srv.Store = ts
	a.rep.SetPeers([]api.Peer{{ID: peer.id, Endpoints: []string{peer.addr}}})
	peer.rep.SetPeers([]api.Peer{{ID: a.id, Endpoints: []string{a.addr}}})
	acked := ingestPaced(b, a.store, names, datas, func(name string, size int64) { a.rep.Stored("reg/data", name, size) })
	return lagsOf(b, acked, ts)
}

// directLags ingests into a fresh local store and, as each object is
// acknowledged, PUTs it with two senders (the replicator's default
// workers), read back from the local store as the replicator does, over
// plain HTTPS to a handler storing it on two disks.
func directLags(b *testing.B, round int, names []string, datas [][]byte) []time.Duration {
	dir := b.TempDir()
	src, err := store.Open(quiet(), []store.DiskSpec{{ID: "d1", Root: filepath.Join(dir, "d1")}, {ID: "d2", Root: filepath.Join(dir, "d2")}})
	if err != nil {
		b.Fatal(err)
	}
	url, ts, cl := plainReceiver(b)
	work := make(chan string, len(names))
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for name := range work {
				plainPut(b, cl, url, src, name)
			}
		}()
	}
	acked := ingestPaced(b, src, names, datas, func(name string, _ int64) { work <- name })
	close(work)
	wg.Wait()
	return lagsOf(b, acked, ts)
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
	url, _, cl := plainReceiver(b)
	start := time.Now()
	work := make(chan string)
	var wg sync.WaitGroup
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for name := range work {
				plainPut(b, cl, url, src, name)
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

// plainReceiver serves HTTPS PUTs of objects (/?name=) into a fresh
// mirrored store, recording when each is durable; it returns the URL, the
// store and a client for it.
func plainReceiver(b *testing.B) (string, *timedStore, *http.Client) {
	dir := b.TempDir()
	dst, err := store.Open(quiet(), []store.DiskSpec{{ID: "d1", Root: filepath.Join(dir, "d1")}, {ID: "d2", Root: filepath.Join(dir, "d2")}})
	if err != nil {
		b.Fatal(err)
	}
	ts := &timedStore{Store: dst, arrived: map[string]time.Time{}}
	cert := newPKI(b).attested(b, strings.Repeat("c", 32))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var buf bytes.Buffer
		buf.ReadFrom(r.Body)
		if _, err := ts.Put("reg/data", r.URL.Query().Get("name"), buf.Bytes()); err != nil {
			http.Error(w, err.Error(), 500)
		}
	}), TLSConfig: &tls.Config{Certificates: []tls.Certificate{*cert}}}
	go hs.ServeTLS(ln, "", "")
	b.Cleanup(func() { hs.Close() })
	cl := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, MaxIdleConnsPerHost: 2}}
	return "https://" + ln.Addr().String(), ts, cl
}

// plainPut reads an object from src and PUTs it to a plainReceiver.
func plainPut(b *testing.B, cl *http.Client, url string, src *store.Store, name string) {
	data, err := src.Get("reg/data", name)
	if err != nil {
		b.Error(err)
		return
	}
	req, _ := http.NewRequestWithContext(context.Background(), http.MethodPut, url+"/?name="+name, bytes.NewReader(data))
	resp, err := cl.Do(req)
	if err != nil {
		b.Errorf("plain put: %v", err)
		return
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		b.Errorf("plain put: %s", resp.Status)
	}
}

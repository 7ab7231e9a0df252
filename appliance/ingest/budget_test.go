package ingest_test

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/ingest"
	"github.com/dataembassy/embassy/appliance/objectio"
)

// pseudoRandom streams n deterministic bytes of seed without holding them.
func pseudoRandom(seed uint64, n int64) io.Reader {
	return io.LimitReader(rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)}), n)
}

// TestUploadBudgetBoundsMemory: 40 authenticated uploads of 16 MiB at
// once, ten times the budget. The server holds at most the budget of
// upload bytes (heap growth stays under budget + 48 MiB for TLS, the
// test's own client and garbage not yet collected, under a soft memory
// limit as on the appliance), refuses the rest with 503 and Retry-After, and every
// object, once the clients retried as restic does, is stored intact.
func TestUploadBudgetBoundsMemory(t *testing.T) {
	const (
		uploads = 40
		size    = 16 << 20
		budget  = 64 << 20
		slack   = 48 << 20
	)
	f := start(t, func(s *ingest.Server) { s.Budget = objectio.NewBudget(budget) })
	names := make([]string, uploads)
	for i := range names {
		h := sha256.New()
		io.Copy(h, pseudoRandom(uint64(i), size))
		names[i] = hex.EncodeToString(h.Sum(nil))
	}
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: f.srvCAPool, Certificates: []tls.Certificate{f.certs["writer"]}},
		MaxConnsPerHost: uploads, MaxIdleConnsPerHost: uploads,
	}}
	if resp, err := client.Post(f.url+"/population/?create=true", "", nil); err != nil || resp.StatusCode != 200 {
		t.Fatalf("create repository: %v %v", err, resp)
	}

	runtime.GC()
	var base runtime.MemStats
	runtime.ReadMemStats(&base)
	// As on the appliance (initseq sets a soft memory limit above the
	// budget): without it the collector lets freed upload buffers pile up
	// to twice the live heap before it runs.
	defer debug.SetMemoryLimit(debug.SetMemoryLimit(int64(base.HeapInuse) + budget + 32<<20))
	var peak atomic.Uint64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		var m runtime.MemStats
		for {
			runtime.ReadMemStats(&m)
			if m.HeapInuse > peak.Load() {
				peak.Store(m.HeapInuse)
			}
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()

	var busy, retryAfter, resets atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, uploads)
	for i := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for attempt := 0; ; attempt++ {
				req, _ := http.NewRequest(http.MethodPost, f.url+"/population/data/"+names[i], pseudoRandom(uint64(i), size))
				req.ContentLength = size
				resp, err := client.Do(req)
				if err != nil {
					// A 503 is answered before the body is read; the
					// server then closes the connection, and a client
					// still writing the body may see the reset instead
					// of the answer. restic retries both alike.
					if attempt < 200 {
						resets.Add(1)
						time.Sleep(20 * time.Millisecond)
						continue
					}
					errs <- fmt.Errorf("upload %d: %d attempts, last: %w", i, attempt+1, err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				switch resp.StatusCode {
				case http.StatusOK:
					return
				case http.StatusServiceUnavailable:
					busy.Add(1)
					if resp.Header.Get("Retry-After") != "" {
						retryAfter.Add(1)
					}
					time.Sleep(20 * time.Millisecond)
				default:
					errs <- fmt.Errorf("upload %d: %s", i, resp.Status)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	<-sampled
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	grown := int64(peak.Load()) - int64(base.HeapInuse)
	t.Logf("%d uploads of %d MiB, budget %d MiB: heap grew by at most %d MiB; %d answers were 503 (%d with Retry-After), %d connections reset while refused",
		uploads, size>>20, budget>>20, grown>>20, busy.Load(), retryAfter.Load(), resets.Load())
	if grown > budget+slack {
		t.Fatalf("heap grew by %d MiB, ceiling %d MiB (budget %d + %d)", grown>>20, (budget+slack)>>20, budget>>20, slack>>20)
	}
	if busy.Load() == 0 || retryAfter.Load() != busy.Load() {
		t.Fatalf("%d busy answers, %d with Retry-After: the budget was never reached or said nothing", busy.Load(), retryAfter.Load())
	}
	for i, name := range names {
		data, err := f.srv.Store.Get("population/data", name)
		if err != nil {
			t.Fatalf("object %d: %v", i, err)
		}
		want, _ := io.ReadAll(pseudoRandom(uint64(i), size))
		if !bytes.Equal(data, want) {
			t.Fatalf("object %d stored differently", i)
		}
	}
}

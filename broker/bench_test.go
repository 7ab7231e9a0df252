package broker_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// BenchmarkAttestRoundTrips measures full attest-and-release round trips
// over HTTPS on loopback against one broker (quote verification, event-log
// replay, manifest check, one share sealed to the EK, certificate issued,
// state and audit written), with 1, 8 and 64 concurrent appliances, each
// request on a fresh TLS connection as independent appliances make them.
// The evidence (nonces and quotes) is made beforehand so the TPM simulator
// is not what is measured. Baseline, same run: bare TLS round trips to a
// trivial handler with the broker's TLS configuration.
func BenchmarkAttestRoundTrips(b *testing.B) {
	e := newEnv(b, 1, 1)
	e.brokers[0].cfg.NonceTTL = time.Hour
	e.stop(0)
	e.start(0)
	d := tpmtest.NewBootDigests("image-1")
	a := e.boot(1, d, attester.EKRSA)
	defer a.shutdown()
	provision(b, e, a, d)

	trivialLn, _ := net.Listen("tcp", "127.0.0.1:0")
	trivial := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte("{}\n"))
	}), TLSConfig: e.brokers[0].b.ApplianceTLSConfig(e.brokers[0].serverCert)}
	go trivial.ServeTLS(trivialLn, "", "")
	defer trivial.Close()

	const perLevel, rounds = 200, 3
	for _, conc := range []int{1, 8, 64} {
		var ratios []float64
		var rps, brps float64
		var p50, p99, bp50, bp99 time.Duration
		for round := 0; round < rounds; round++ {
			reqs := make([][]byte, perLevel)
			for i := range reqs {
				var n api.NonceResponse
				if err := postJSON(e, 0, api.PathNonce, api.NonceRequest{ApplianceID: a.c.ID()}, &n); err != nil {
					b.Fatal(err)
				}
				reqs[i], _ = json.Marshal(quoteRequest(b, a, a.c.ID(), n.Nonce))
			}
			attestURL := e.cfg.Brokers[0].Endpoints[0] + api.PathAttest
			rps, p50, p99 = load(b, e, attestURL, reqs, conc, true)
			base := make([][]byte, perLevel)
			for i := range base {
				base[i] = []byte("{}")
			}
			brps, bp50, bp99 = load(b, e, "https://"+trivialLn.Addr().String()+"/", base, conc, false)
			ratios = append(ratios, rps/brps)
		}
		sort.Float64s(ratios)
		ratio := ratios[len(ratios)/2]
		b.ReportMetric(rps, fmt.Sprintf("attest/s@%d", conc))
		b.ReportMetric(ratio, fmt.Sprintf("ratio@%d", conc))
		fmt.Printf("concurrency %2d: attest %6.0f/s p50 %6.1fms p99 %6.1fms | bare TLS %6.0f/s p50 %5.1fms p99 %5.1fms | median ratio of %d rounds %.2f (target >= 0.5; >= 200/s at 8)\n",
			conc, rps, ms(p50), ms(p99), brps, ms(bp50), ms(bp99), rounds, ratio)
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// load posts every body with conc workers, each request on a new TLS
// connection, and returns requests/s and the p50 and p99 latencies.
func load(b *testing.B, e *env, url string, bodies [][]byte, conc int, wantShares bool) (float64, time.Duration, time.Duration) {
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true, TLSClientConfig: &tls.Config{RootCAs: e.rootPool()}}}
	lat := make([]time.Duration, len(bodies))
	var wg sync.WaitGroup
	next := make(chan int)
	var failed error
	var mu sync.Mutex
	start := time.Now()
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				t0 := time.Now()
				resp, err := hc.Post(url, "application/json", bytes.NewReader(bodies[i]))
				if err == nil {
					data, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK {
						err = fmt.Errorf("status %d: %s", resp.StatusCode, data)
					} else if wantShares {
						var ar api.AttestResponse
						if jerr := json.Unmarshal(data, &ar); jerr != nil || len(ar.Shares) != 1 {
							err = fmt.Errorf("no share released: %v", jerr)
						}
					}
				}
				lat[i] = time.Since(t0)
				if err != nil {
					mu.Lock()
					failed = err
					mu.Unlock()
				}
			}
		}()
	}
	for i := range bodies {
		next <- i
	}
	close(next)
	wg.Wait()
	elapsed := time.Since(start)
	if failed != nil {
		b.Fatal(failed)
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	return float64(len(bodies)) / elapsed.Seconds(), lat[len(lat)/2], lat[len(lat)*99/100]
}

var _ = context.Background

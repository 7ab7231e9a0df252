package broker_test

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/protocol/identity"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// BenchmarkAttestRoundTrips measures full attest-and-release round trips
// over HTTPS on loopback against one broker (quote verification, event-log
// replay, manifest check, one share sealed to the appliance's EK,
// certificate issued, state and audit written) at 1, 8 and 64 concurrent
// appliances. Concurrency N is N distinct enrolled appliances (see fleet:
// each its own simulated TPM, EK and AK, enrolled, activated and holding a
// deposited share); worker w sends only appliance w's requests, each on a
// fresh TLS connection as independent appliances make them. The evidence
// (a broker nonce per request, quoted by the appliance's own TPM) is made
// during set-up, which is timed and reported on its own, so the TPM
// simulator is not what is measured.
//
// Baseline, same run: bare TLS round trips to a trivial handler with the
// broker's TLS configuration, the same workers and request counts. Each
// level runs rounds of attest then baseline, alternating; the ratio is the
// median of the rounds' ratios, the rates are the rounds' medians and
// p50/p99 are over every round's requests.
//
// The benchmark fails unless, at every level and round, the responses
// carry certificates for exactly N distinct appliance ids, each its
// worker's own with one share, and broker 0's audit log shows one release
// per request from exactly those N appliances and no failed attestation.
func BenchmarkAttestRoundTrips(b *testing.B) {
	benchAttestRoundTrips(b, []int{1, 8, 64}, 200, 3, nil)
}

// benchAttestRoundTrips runs the benchmark at the given concurrency levels,
// with about perLevel requests per round (at least one per appliance).
// prepare, when not nil, changes broker 0 before the fleet is made (e.g. its
// master key into a token).
func benchAttestRoundTrips(b *testing.B, levels []int, perLevel, rounds int, prepare func(*env)) {
	perWorker := func(conc int) int { return (perLevel + conc - 1) / conc }

	setupStart := time.Now()
	e := newEnv(b, 1, 1)
	e.brokers[0].cfg.NonceTTL = time.Hour
	e.stop(0)
	e.start(0)
	if prepare != nil {
		prepare(e)
	}
	d := tpmtest.NewBootDigests("image-1")
	e.approveImage(1, d)
	f := newFleet(b, e, d, levels, rounds, perWorker)
	setup := time.Since(setupStart)
	fmt.Printf("set-up: %d appliances (own TPM simulator each, enrolled, share deposited) and their evidence in %.1fs\n",
		len(f.ids), setup.Seconds())

	trivialLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	trivial := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte("{}\n"))
	}), TLSConfig: e.brokers[0].b.ApplianceTLSConfig(e.brokers[0].serverCert)}
	go trivial.ServeTLS(trivialLn, "", "")
	defer trivial.Close()
	attestURL := e.cfg.Brokers[0].Endpoints[0] + api.PathAttest
	trivialURL := "https://" + trivialLn.Addr().String() + "/"

	_, _, seq := auditedSince(b, e, 0)
	b.ResetTimer()
	b.ReportMetric(setup.Seconds(), "setup-s")
	for _, conc := range levels {
		var ratios, rates, baseRates []float64
		var lats, baseLats []time.Duration
		for round := range rounds {
			work := f.work(batch{conc, round})
			rps, lat, resps := load(b, e, attestURL, work)
			releases, failures, head := auditedSince(b, e, seq)
			seq = head
			checkDistinct(b, e, f, conc, work, resps, releases, failures)

			base := make([][][]byte, conc)
			for w := range base {
				base[w] = slices.Repeat([][]byte{[]byte("{}")}, len(work[w]))
			}
			brps, blat, _ := load(b, e, trivialURL, base)

			ratios, rates, baseRates = append(ratios, rps/brps), append(rates, rps), append(baseRates, brps)
			lats, baseLats = append(lats, lat...), append(baseLats, blat...)
		}
		ratio, rps, brps := median(ratios), median(rates), median(baseRates)
		b.ReportMetric(rps, fmt.Sprintf("attest/s@%d", conc))
		b.ReportMetric(ratio, fmt.Sprintf("ratio@%d", conc))
		p50, p99 := percentiles(lats)
		bp50, bp99 := percentiles(baseLats)
		fmt.Printf("concurrency %2d (%2d distinct appliances, %d requests/round): attest %6.0f/s p50 %6.1fms p99 %6.1fms | bare TLS %6.0f/s p50 %5.1fms p99 %5.1fms | ratio per round %.2f, median of %d %.2f (target >= 0.5; >= 200/s at 8)\n",
			conc, conc, conc*perWorker(conc), rps, ms(p50), ms(p99), brps, ms(bp50), ms(bp99), ratios, rounds, ratio)
	}
}

// checkDistinct fails the benchmark unless one round at concurrency conc
// was served to exactly conc distinct appliances: every response is a
// release of one share with a certificate naming the worker's own
// appliance, and the broker's audit has one release per request, from
// those appliances only, and no failed attestation.
func checkDistinct(b *testing.B, e *env, f *fleet, conc int, work, resps [][][]byte, releases, failures map[string]int) {
	b.Helper()
	if len(failures) != 0 {
		b.Fatalf("concurrency %d: failed attestations audited: %v", conc, failures)
	}
	answered := map[string]int{}
	for w := range work {
		for _, data := range resps[w] {
			var ar api.AttestResponse
			if err := json.Unmarshal(data, &ar); err != nil {
				b.Fatalf("concurrency %d, worker %d: %v", conc, w, err)
			}
			if len(ar.Shares) != 1 {
				b.Fatalf("concurrency %d, worker %d: %d shares released, want 1", conc, w, len(ar.Shares))
			}
			id, err := certifiedAppliance(e, ar.Certificate)
			if err != nil {
				b.Fatalf("concurrency %d, worker %d: %v", conc, w, err)
			}
			if id != f.ids[w] {
				b.Fatalf("concurrency %d, worker %d: certificate for %s, want its own appliance %s", conc, w, id, f.ids[w])
			}
			answered[id]++
		}
		if got := releases[f.ids[w]]; got != len(work[w]) {
			b.Fatalf("concurrency %d: broker audited %d releases to %s, want %d", conc, got, f.ids[w], len(work[w]))
		}
	}
	if len(answered) != conc || len(releases) != conc {
		b.Fatalf("concurrency %d: %d distinct appliances certified and %d in the audit's releases, want %d",
			conc, len(answered), len(releases), conc)
	}
}

// certifiedAppliance returns the appliance id a released certificate chain
// names, verified up to the broker CA.
func certifiedAppliance(e *env, chainDER [][]byte) (string, error) {
	var chain []*x509.Certificate
	for _, der := range chainDER {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return "", err
		}
		chain = append(chain, c)
	}
	return identity.Verify(chain, e.rootPool(), time.Now(), x509.ExtKeyUsageServerAuth)
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

func percentiles(lat []time.Duration) (p50, p99 time.Duration) {
	s := slices.Clone(lat)
	slices.Sort(s)
	return s[len(s)/2], s[len(s)*99/100]
}

// load runs one worker per element of work; worker w posts work[w] in
// order, each request on a new TLS connection. It returns requests/s over
// the whole batch, every request's latency and every worker's response
// bodies (checked by the caller, outside the timed region).
func load(b *testing.B, e *env, url string, work [][][]byte) (float64, []time.Duration, [][][]byte) {
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true, TLSClientConfig: &tls.Config{RootCAs: e.rootPool()}}}
	lats := make([][]time.Duration, len(work))
	resps := make([][][]byte, len(work))
	errs := make([]error, len(work))
	total := 0
	var wg sync.WaitGroup
	start := time.Now()
	for w, bodies := range work {
		total += len(bodies)
		wg.Go(func() {
			for _, body := range bodies {
				t0 := time.Now()
				resp, err := hc.Post(url, "application/json", bytes.NewReader(body))
				if err != nil {
					errs[w] = err
					return
				}
				data, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				lats[w] = append(lats[w], time.Since(t0))
				if err == nil && resp.StatusCode != http.StatusOK {
					err = fmt.Errorf("status %d: %s", resp.StatusCode, data)
				}
				if err != nil {
					errs[w] = err
					return
				}
				resps[w] = append(resps[w], data)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	for w, err := range errs {
		if err != nil {
			b.Fatalf("worker %d: %v", w, err)
		}
	}
	return float64(total) / elapsed.Seconds(), slices.Concat(lats...), resps
}

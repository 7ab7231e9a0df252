package broker_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	pb "github.com/google/go-tpm-tools/proto/tpm"
	"google.golang.org/protobuf/proto"

	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/protocol/identity"
	"github.com/dataembassy/embassy/tpm/eventlog"
	"github.com/dataembassy/embassy/tpm/pcrs"
	"github.com/dataembassy/embassy/tpm/tpmtest"
	"github.com/dataembassy/embassy/tpm/verifier"
)

// BenchmarkAttestRoundTrips measures full attest-and-release round trips
// over HTTPS on loopback against one broker (quote verification, event-log
// replay, manifest check, one share opened under the master key and sealed
// to the appliance's EK, certificate issued, state and audit written) at 1,
// 8 and 64 concurrent appliances, once per master-key backend (key=file,
// key=softhsm2: see forEachKey). Concurrency N is N distinct enrolled
// appliances (see fleet: each its own simulated TPM, EK and AK, enrolled,
// activated and holding a deposited share); worker w sends only appliance
// w's requests, each on a fresh TLS connection as independent appliances
// make them. The evidence (a broker nonce per request, quoted by the
// appliance's own TPM) is made during set-up, which is timed and reported
// on its own, so the TPM simulator is not what is measured.
//
// One round trip is thus one HTTPS request, POST /v1/attest, with its own
// full TLS 1.3 handshake: the appliance client (appliance/attest) also
// sends each request on a new connection (DisableKeepAlives, no session
// resumption), and it sends two per broker and attestation (nonce, then
// attest); the nonce request is not measured here, as a quote has to be
// made between the two. Baseline, same run: bare TLS round trips, one
// request each on a new connection with the same client settings (load),
// to a trivial handler with the broker's TLS configuration, the same
// workers and request counts: so both sides pay one handshake per
// request. Each
// level runs rounds of attest then baseline, alternating; the ratio is the
// median of the rounds' ratios, the rates are the rounds' medians and
// p50/p99 are over every round's requests. Target (issue 13): ratio >= 0.6
// at 8.
//
// The benchmark fails unless, at every level and round, the responses
// carry certificates for exactly N distinct appliance ids, each its
// worker's own with one share, and broker 0's audit log shows one release
// per request from exactly those N appliances and no failed attestation.
func BenchmarkAttestRoundTrips(b *testing.B) {
	forEachKey(b, func(b *testing.B, key string) {
		benchAttestRoundTrips(b, key, []int{1, 8, 64}, 200, 3)
	})
}

// benchAttestRoundTrips runs the benchmark at the given concurrency levels,
// with about perLevel requests per round (at least one per appliance).
func benchAttestRoundTrips(b *testing.B, key string, levels []int, perLevel, rounds int) {
	perWorker := func(conc int) int { return (perLevel + conc - 1) / conc }

	setupStart := time.Now()
	e := benchEnv(b, key)
	d := tpmtest.NewBootDigests("image-1")
	e.approveImage(1, d)
	plan := map[batch]int{}
	for _, conc := range levels {
		for r := range rounds {
			plan[batch{"https", conc, r}] = perWorker(conc)
		}
	}
	f := newFleet(b, e, d, plan)
	setup := time.Since(setupStart)
	fmt.Printf("key=%s set-up: %d appliances (own TPM simulator each, enrolled, share deposited) and their evidence in %.1fs\n",
		key, len(f.ids), setup.Seconds())

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
		var ratios, rates, baseRates, cores, baseCores []float64
		var lats, baseLats []time.Duration
		for round := range rounds {
			work := f.work(batch{"https", conc, round})
			busy := startBusy()
			rps, lat, bodies := load(b, e, attestURL, work)
			cores = append(cores, busy())
			releases, failures, head := auditedSince(b, e, seq)
			seq = head
			checkDistinct(b, e, f, conc, decodeAll(b, bodies), releases, failures)

			base := make([][][]byte, conc)
			for w := range base {
				base[w] = slices.Repeat([][]byte{[]byte("{}")}, len(work[w]))
			}
			busy = startBusy()
			brps, blat, _ := load(b, e, trivialURL, base)
			baseCores = append(baseCores, busy())

			ratios, rates, baseRates = append(ratios, rps/brps), append(rates, rps), append(baseRates, brps)
			lats, baseLats = append(lats, lat...), append(baseLats, blat...)
		}
		ratio, rps, brps := median(ratios), median(rates), median(baseRates)
		b.ReportMetric(rps, fmt.Sprintf("attest/s@%d", conc))
		b.ReportMetric(ratio, fmt.Sprintf("ratio@%d", conc))
		p50, p99 := percentiles(lats)
		bp50, bp99 := percentiles(baseLats)
		target := ""
		if conc == 8 {
			target = " (target >= 0.6)"
		}
		fmt.Printf("key=%s concurrency %2d (%2d distinct appliances, %d requests/round): attest %6.0f/s p50 %6.1fms p99 %6.1fms, %.2f cores | bare TLS %6.0f/s p50 %5.1fms p99 %5.1fms, %.2f cores | ratio per round %.2f, median of %d %.2f%s\n",
			key, conc, conc, conc*perWorker(conc), rps, ms(p50), ms(p99), median(cores), brps, ms(bp50), ms(bp99), median(baseCores), ratios, rounds, ratio, target)
	}
}

// verifySealTarget is issue 13's in-process target on 2 cores (Keylime's
// published verifier rate), attestations verified and released per second.
const verifySealTarget = 2500

// BenchmarkVerifySeal measures attestations per second in process, no
// HTTP or TLS: Broker.Attest on a decoded request, that is the whole
// verification (nonce, quote, event-log replay, firmware reference,
// manifest, counters) and release (share opened under the master key and
// sealed to the appliance's EK, certificate issued, record and audit
// entries durable), once per master-key backend, at 8 and 64 concurrent
// distinct appliances (the fleet's; worker w calls Attest with appliance
// w's requests only).
//
// The rate includes the commit: an attestation counts once its record and
// audit entries are durable (audit log fsynced, database transaction
// committed; concurrent attestations share both, see Broker.commit), as
// the broker answers only then. The cores figure printed is the process's
// CPU time over the round's wall time: below 2, the round also waited.
//
// Baseline, same run, alternating rounds on the same requests: the TPM
// cryptography an attestation cannot do without, with no broker around
// it: the AK parsed, the quote verified, the event log replayed and a
// share sealed to the EK under the quoted PCRs. The ratio (median of the
// rounds') says what the broker's own work costs; the rate is also
// compared with the target (verifySealTarget). The same checks as
// BenchmarkAttestRoundTrips make sure every call released one share to its
// own appliance.
func BenchmarkVerifySeal(b *testing.B) {
	forEachKey(b, func(b *testing.B, key string) {
		benchVerifySeal(b, key, []int{8, 64}, 1024, 3)
	})
}

func benchVerifySeal(b *testing.B, key string, levels []int, perLevel, rounds int) {
	perWorker := func(conc int) int { return (perLevel + conc - 1) / conc }

	setupStart := time.Now()
	e := benchEnv(b, key)
	d := tpmtest.NewBootDigests("image-1")
	e.approveImage(1, d)
	plan := map[batch]int{}
	for _, conc := range levels {
		for r := range rounds {
			plan[batch{"in-process", conc, r}] = perWorker(conc)
		}
	}
	f := newFleet(b, e, d, plan)
	setup := time.Since(setupStart)
	fmt.Printf("key=%s set-up: %d appliances and their evidence in %.1fs\n", key, len(f.ids), setup.Seconds())

	_, _, seq := auditedSince(b, e, 0)
	b.ResetTimer()
	b.ReportMetric(setup.Seconds(), "setup-s")
	for _, conc := range levels {
		var ratios, rates, baseRates, cores []float64
		for round := range rounds {
			reqs := decodeRequests(b, f.work(batch{"in-process", conc, round}))
			busy := startBusy()
			rps, resps := attestInProcess(b, e.brokers[0].b, reqs)
			cores = append(cores, busy())
			releases, failures, head := auditedSince(b, e, seq)
			seq = head
			checkDistinct(b, e, f, conc, resps, releases, failures)
			brps := cryptoOnly(b, f, reqs)
			ratios, rates, baseRates = append(ratios, rps/brps), append(rates, rps), append(baseRates, brps)
		}
		ratio, rps, brps := median(ratios), median(rates), median(baseRates)
		b.ReportMetric(rps, fmt.Sprintf("verify+seal/s@%d", conc))
		b.ReportMetric(ratio, fmt.Sprintf("ratio@%d", conc))
		fmt.Printf("key=%s in process, concurrency %2d (%2d distinct appliances, %d requests/round): verify+seal %6.0f/s, %.2fx the %d/s target, %.2f cores | TPM crypto alone %6.0f/s | ratio per round %.2f, median of %d %.2f\n",
			key, conc, conc, conc*perWorker(conc), rps, rps/verifySealTarget, verifySealTarget, median(cores), brps, ratios, rounds, ratio)
	}
}

// decodeRequests decodes every worker's request bodies.
func decodeRequests(b *testing.B, work [][][]byte) [][]*api.AttestRequest {
	out := make([][]*api.AttestRequest, len(work))
	for w, bodies := range work {
		for _, body := range bodies {
			var req api.AttestRequest
			if err := json.Unmarshal(body, &req); err != nil {
				b.Fatal(err)
			}
			out[w] = append(out[w], &req)
		}
	}
	return out
}

// decodeAll decodes every worker's attest responses.
func decodeAll(b *testing.B, bodies [][][]byte) [][]*api.AttestResponse {
	out := make([][]*api.AttestResponse, len(bodies))
	for w, ws := range bodies {
		for _, data := range ws {
			var ar api.AttestResponse
			if err := json.Unmarshal(data, &ar); err != nil {
				b.Fatalf("worker %d: %v", w, err)
			}
			out[w] = append(out[w], &ar)
		}
	}
	return out
}

// attestInProcess runs one worker per element of reqs, each calling
// br.Attest with its requests in order, and returns attestations/s over the
// whole batch and the responses.
func attestInProcess(b *testing.B, br *broker.Broker, reqs [][]*api.AttestRequest) (float64, [][]*api.AttestResponse) {
	resps := make([][]*api.AttestResponse, len(reqs))
	errs := make([]error, len(reqs))
	total := 0
	var wg sync.WaitGroup
	start := time.Now()
	for w, rs := range reqs {
		total += len(rs)
		wg.Go(func() {
			for _, req := range rs {
				resp, err := br.Attest(req)
				if err != nil {
					errs[w] = err
					return
				}
				resps[w] = append(resps[w], resp)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		b.Fatal(err)
	}
	return float64(total) / elapsed.Seconds(), resps
}

// cryptoOnly is BenchmarkVerifySeal's baseline: for every request, with
// the same workers, what any verifier must compute (AK parsed, quote
// verified against the nonce and TLS key, event log replayed, a 33-byte
// share sealed to the EK under the quoted policy PCRs), nothing stored.
// It returns requests/s.
func cryptoOnly(b *testing.B, f *fleet, reqs [][]*api.AttestRequest) float64 {
	share := make([]byte, 33)
	rand.Read(share)
	errs := make([]error, len(reqs))
	total := 0
	var wg sync.WaitGroup
	start := time.Now()
	for w, rs := range reqs {
		total += len(rs)
		wg.Go(func() {
			for _, req := range rs {
				if err := verifyAndSeal(f.akPublic[w], f.ekPublic[w], req, share); err != nil {
					errs[w] = err
					return
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		b.Fatal(err)
	}
	return float64(total) / elapsed.Seconds()
}

func verifyAndSeal(akPublic, ekPublic []byte, req *api.AttestRequest, share []byte) error {
	ak, err := verifier.ParseAK(akPublic)
	if err != nil {
		return err
	}
	h := sha256.Sum256(req.TLSPublic)
	q := &pb.Quote{Quote: req.Quote, RawSig: req.Signature, Pcrs: pcrs.Proto(req.PCRs)}
	info, err := verifier.VerifyQuote(ak, q, api.ExtraData(req.Nonce, h[:]))
	if err != nil {
		return err
	}
	if _, err := eventlog.Replay(req.EventLog, info.PCRs); err != nil {
		return err
	}
	ek, err := x509.ParsePKIXPublicKey(ekPublic)
	if err != nil {
		return err
	}
	policy := map[int][]byte{}
	for _, i := range pcrs.Indexes() {
		policy[i] = info.PCRs[i]
	}
	blob, err := verifier.Seal(ek, share, policy)
	if err != nil {
		return err
	}
	_, err = proto.Marshal(blob)
	return err
}

// checkDistinct fails the benchmark unless one round at concurrency conc
// was served to exactly conc distinct appliances: every response is a
// release of one share with a certificate naming the worker's own
// appliance, and the broker's audit has one release per request, from
// those appliances only, and no failed attestation.
func checkDistinct(b *testing.B, e *env, f *fleet, conc int, resps [][]*api.AttestResponse, releases, failures map[string]int) {
	b.Helper()
	if len(failures) != 0 {
		b.Fatalf("concurrency %d: failed attestations audited: %v", conc, failures)
	}
	answered := map[string]int{}
	for w, ws := range resps {
		for _, ar := range ws {
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
		if got := releases[f.ids[w]]; got != len(ws) {
			b.Fatalf("concurrency %d: broker audited %d releases to %s, want %d", conc, got, f.ids[w], len(ws))
		}
	}
	if len(resps) != conc || len(answered) != conc || len(releases) != conc {
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

// startBusy starts measuring the process's CPU time (user and system, all
// threads); the function it returns gives the cores busy on average since,
// so a round that did not keep both cores busy (waiting on the disk, or on
// a machine other work shares) shows as such.
func startBusy() func() float64 {
	cpu := func() time.Duration {
		var ru syscall.Rusage
		syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	c0, t0 := cpu(), time.Now()
	return func() float64 { return (cpu() - c0).Seconds() / time.Since(t0).Seconds() }
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
// order, each request on a new TLS connection (full TLS 1.3 handshake, no
// keep-alive or session resumption, as the appliance client does). It returns requests/s over
// the whole batch, every request's latency and every worker's response
// bodies (checked by the caller, outside the timed region).
func load(b *testing.B, e *env, url string, work [][][]byte) (float64, []time.Duration, [][][]byte) {
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true,
		TLSClientConfig: &tls.Config{RootCAs: e.rootPool(), MinVersion: tls.VersionTLS13}}}
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

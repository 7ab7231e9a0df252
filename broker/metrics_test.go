package broker_test

import (
	"bufio"
	"crypto/tls"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// scrape reads broker i's metrics over the operator API, with the operator
// certificate unless anonymous, and returns the status and the samples by
// series ("name{labels}").
func (e *env) scrape(i int, anonymous bool) (int, map[string]float64) {
	e.t.Helper()
	tc := &tls.Config{RootCAs: e.rootPool()}
	if !anonymous {
		tc.Certificates = []tls.Certificate{e.opCert}
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: tc}}
	resp, err := hc.Get("https://" + e.brokers[i].opLn.Addr().String() + api.PathMetrics)
	if err != nil {
		if anonymous {
			return 0, nil // the TLS layer refused the handshake
		}
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	samples := map[string]float64{}
	sc := bufio.NewScanner(io.LimitReader(resp.Body, 1<<20))
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		at := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[at+1:], 64)
		if err != nil {
			e.t.Fatalf("metrics line %q: %v", line, err)
		}
		samples[line[:at]] = v
	}
	return resp.StatusCode, samples
}

func TestMetrics(t *testing.T) {
	e := newEnv(t, 1, 1)
	d := tpmtest.NewBootDigests("image-1")
	a := e.boot(1, d, attester.EKRSA)
	defer a.shutdown()
	provision(t, e, a, d)

	status, before := e.scrape(0, false)
	if status != http.StatusOK {
		t.Fatalf("metrics answered %d", status)
	}
	const (
		attestOK       = `embassy_broker_attestations_total{reason="none",result="ok"}`
		attestReplayed = `embassy_broker_attestations_total{reason="nonce_unknown",result="fail"}`
		released       = `embassy_broker_shares_released_total`
		audits         = `embassy_broker_audit_appends_total`
		nonces         = `embassy_broker_nonces_outstanding`
		attestLatency  = `embassy_broker_request_duration_seconds_count{code="200",route="/v1/appliance/attest"}`
		refusedLatency = `embassy_broker_request_duration_seconds_count{code="403",route="/v1/appliance/attest"}`
	)
	// provision attested once (no share yet) and deposited one.
	if before[attestOK] != 1 || before[released] != 0 || before[attestLatency] != 1 {
		t.Fatalf("after provisioning: %s=%v %s=%v %s=%v", attestOK, before[attestOK], released, before[released], attestLatency, before[attestLatency])
	}

	// One good attestation (one share released), one replayed nonce and
	// one nonce left outstanding.
	a.reboot(t, d)
	var captured api.AttestRequest
	if _, err := rawAttest(t, e, a, 0, func(r *api.AttestRequest) { captured = *r }); err != nil {
		t.Fatal(err)
	}
	if _, err := postAttest(e, 0, captured); err == nil {
		t.Fatal("replayed nonce accepted")
	}
	if err := postJSON(e, 0, api.PathNonce, api.NonceRequest{ApplianceID: a.c.ID()}, &api.NonceResponse{}); err != nil {
		t.Fatal(err)
	}

	_, after := e.scrape(0, false)
	moved := []struct {
		series string
		by     float64
	}{
		{attestOK, 1},
		{attestReplayed, 1},
		{released, 1},
		{attestLatency, 1},
		{refusedLatency, 1},
		{audits, 3}, // attest, release, the refusal
	}
	for _, m := range moved {
		if got := after[m.series] - before[m.series]; got != m.by {
			t.Errorf("%s moved by %v, want %v", m.series, got, m.by)
		}
	}
	if after[nonces] != 1 {
		t.Errorf("%s = %v, want 1", nonces, after[nonces])
	}
	for series := range after {
		if strings.Contains(series, "route=") && !strings.Contains(series, `route="/`) {
			t.Errorf("unbounded route label: %s", series)
		}
	}

	// Only operators read the metrics.
	if status, _ := e.scrape(0, true); status == http.StatusOK {
		t.Fatal("metrics served without an operator certificate")
	}
}

// TestMetricsPerBroker: two brokers in one process keep their own counts
// (no global registry).
func TestMetricsPerBroker(t *testing.T) {
	e := newEnv(t, 2, 2)
	if err := postJSON(e, 0, api.PathNonce, api.NonceRequest{ApplianceID: strings.Repeat("a", 32)}, &api.NonceResponse{}); err != nil {
		t.Fatal(err)
	}
	_, a := e.scrape(0, false)
	_, b := e.scrape(1, false)
	if a["embassy_broker_nonces_outstanding"] != 1 || b["embassy_broker_nonces_outstanding"] != 0 {
		t.Fatalf("nonces: broker-a %v, broker-b %v", a["embassy_broker_nonces_outstanding"], b["embassy_broker_nonces_outstanding"])
	}
}

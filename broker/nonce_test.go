package broker_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// floodNonces sends n nonce requests through broker b's appliance handler,
// the i-th for id(i), and returns how many were answered with a nonce.
func floodNonces(t *testing.T, b *broker.Broker, n int, id func(int) string) int {
	t.Helper()
	h := b.ApplianceHandler()
	issued := 0
	for i := 0; i < n; i++ {
		body, _ := json.Marshal(api.NonceRequest{ApplianceID: id(i)})
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(http.MethodPost, api.PathNonce, bytes.NewReader(body)))
		if w.Code == http.StatusOK {
			issued++
		}
	}
	return issued
}

func randomID() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// TestNonceFloodStarvesNoOne: an attacker floods one broker's
// unauthenticated nonce endpoint with 100,000 requests, for one id the
// broker does not know, for an enrolled appliance's id, or for a new id
// each time. Another appliance still attests and gets its share, and the
// broker holds a bounded number of nonces.
func TestNonceFloodStarvesNoOne(t *testing.T) {
	const flood = 100000
	e := newEnv(t, 1, 1)
	d := tpmtest.NewBootDigests("image-1")
	// A second appliance the broker knows (enrolled, awaiting approval).
	v := e.boot(2, d, attester.EKRSA)
	if err := v.c.Enroll(context.Background()); err != nil {
		t.Fatal(err)
	}
	victim := v.c.ID()
	v.shutdown()
	a := e.boot(1, d, attester.EKRSA)
	defer a.shutdown()
	provision(t, e, a, d)
	records := 2

	unknown := randomID()
	tests := []struct {
		name   string
		id     func(int) string
		maxOut int // outstanding nonces the flood may leave
	}{
		{"one unknown id", func(int) string { return unknown }, broker.MaxNoncesPerAppliance},
		{"an enrolled appliance's id", func(int) string { return victim }, broker.MaxNoncesPerAppliance},
		{"a new id each time", func(int) string { return randomID() }, broker.MaxUnknownNonces},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e.clock.advance(2 * time.Minute) // the last case's nonces expire
			start := time.Now()
			issued := floodNonces(t, e.brokers[0].b, flood, tc.id)
			t.Logf("%d requests in %v, %d answered with a nonce", flood, time.Since(start).Round(time.Millisecond), issued)
			_, m := e.scrape(0, false)
			out := int(m["embassy_broker_nonces_outstanding"])
			if bound := broker.MaxUnknownNonces + broker.MaxNoncesPerAppliance*records; out > tc.maxOut || out > bound {
				t.Errorf("%d nonces outstanding after the flood, want at most %d", out, tc.maxOut)
			}
			results, err := a.c.AttestAll(ctxTimeout(t, 10*time.Second), fastRetry, 1)
			if err != nil {
				t.Fatalf("appliance %s cannot attest during the flood: %v", a.c.ID(), err)
			}
			if len(results[0].Shares) != 1 {
				t.Fatalf("released %d shares, want 1", len(results[0].Shares))
			}
		})
	}
}

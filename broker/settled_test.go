package broker_test

import (
	"errors"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// TestSettledRefusalEndsRound: an appliance whose image no broker approved
// learns it is below threshold as soon as every broker refused once, not
// when the round's time runs out; a broker that is down still keeps the
// round open (a retry can reach it).
func TestSettledRefusalEndsRound(t *testing.T) {
	e := newEnv(t, 3, 2)
	d := tpmtest.NewBootDigests("image-unapproved")
	a := e.boot(1, d, attester.EKRSA)
	defer a.shutdown()
	e.enroll(a)
	const round = 20 * time.Second
	bo := attest.Backoff{Initial: time.Second, Max: 5 * time.Second}

	start := time.Now()
	_, _, err := a.c.AttestFirst(ctxTimeout(t, round), bo, 2)
	took := time.Since(start)
	var be *attest.BrokerError
	if !errors.Is(err, attest.ErrBelowThreshold) || !errors.As(err, &be) || be.Code != api.CodeImage {
		t.Fatalf("attest with an unapproved image: %v", err)
	}
	if took > round/4 {
		t.Fatalf("the refused round took %s, want it decided once every broker refused", took)
	}
	t.Logf("refused at every broker: below threshold after %s", took.Round(time.Millisecond))

	// One broker down: the round waits for it.
	e.stop(2)
	start = time.Now()
	_, _, err = a.c.AttestFirst(ctxTimeout(t, 3*time.Second), bo, 2)
	if !errors.Is(err, attest.ErrBelowThreshold) || time.Since(start) < 2*time.Second {
		t.Fatalf("with a broker down the round ended after %s: %v", time.Since(start), err)
	}
}

package broker_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// TestLockedDisksAudited: a server that finds disks it has no share of
// (the disks of a decommissioned server, of a live one, or unknown) gets
// its own keys only, and every broker's attest entry says for each of
// those disks why it stays locked. A disk list past the bound, or with a
// malformed id, is refused.
func TestLockedDisksAudited(t *testing.T) {
	e := newEnv(t, 3, 2)
	oc := e.operatorClient()
	ctx := context.Background()
	d := tpmtest.NewBootDigests("image-1")

	// Server 1: a disk, then decommissioned (revoked, shares destroyed).
	old := e.boot(1, d, attester.EKRSA)
	provision(t, e, old, d)
	oldID := old.c.ID()
	old.shutdown()
	if _, err := oc.Revoke(ctx, oldID); err != nil {
		t.Fatal(err)
	}
	if _, err := oc.DestroyShares(ctx, oldID); err != nil {
		t.Fatal(err)
	}
	// Server 2: a live one with disk-2.
	live := e.boot(2, d, attester.EKRSA)
	e.enroll(live)
	liveID := live.c.ID()
	e.opAll(http.MethodPost, api.PathAppliances+liveID+"/disks", api.DiskApprovalRequest{Count: 1})
	results, err := live.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 3)
	if err != nil {
		t.Fatal(err)
	}
	if err := live.c.Deposit(ctx, results, "disk-2", bytes.Repeat([]byte{7}, 32)); err != nil {
		t.Fatal(err)
	}
	live.shutdown()

	// Server 3 holds disk-1, disk-2 and disk-9.
	next := e.boot(3, d, attester.EKRSA)
	defer next.shutdown()
	e.enroll(next)
	next.c.ReportDisks([]string{"disk-1", "disk-2", "disk-9"})
	results, err = next.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 3)
	if err != nil {
		t.Fatal(err)
	}
	want := "disk-1: " + broker.DiskSharesDestroyed + " " + oldID + "; disk-2: " + broker.DiskOfAnother + " " + liveID + "; disk-9: " + broker.DiskUnknown
	for i, r := range results {
		if len(r.Shares) != 0 {
			t.Errorf("broker %d released %d shares to the new server", i, len(r.Shares))
		}
	}
	for i := range e.brokers {
		ent := e.lastAudit(i, "attest")
		if ent.Appliance != next.c.ID() || ent.Result != "ok" || ent.Detail["locked_disks"] != want {
			t.Errorf("broker %d's attest entry: %+v\nwant locked_disks %q", i, ent, want)
		}
	}

	// Bad lists are refused, by the broker itself (the client sends at
	// most MaxRequestDisks).
	tooMany := make([]string, api.MaxRequestDisks+1)
	for i := range tooMany {
		tooMany[i] = fmt.Sprintf("disk-x%d", i)
	}
	for _, tc := range []struct {
		name  string
		disks []string
	}{
		{"too many", tooMany},
		{"malformed id", []string{"../disk"}},
		{"upper case", []string{"DISK-1"}},
		{"empty id", []string{""}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := &api.AttestRequest{ApplianceID: next.c.ID(), Nonce: make([]byte, 32), TLSPublic: next.c.TLSPublicKey(), Disks: tc.disks}
			_, err := e.brokers[0].b.Attest(req)
			var rj *broker.Rejection
			if !errors.As(err, &rj) || rj.Reason != broker.ReasonBadRequest {
				t.Fatalf("attest with disks %q: %v, want %s", tc.disks, err, broker.ReasonBadRequest)
			}
		})
	}
}

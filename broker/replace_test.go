package broker_test

import (
	"context"
	"errors"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/operator/opclient"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// TestReplace: old server A (provisioned, dead) is replaced by C, enrolled
// at home. C gets as many disk approvals as A had and A's endpoints at
// every broker; A is left alone while C has not caught up (its twin B
// still has objects for it); once C reports its disks healthy and B has
// nothing pending for C, A is revoked everywhere and its shares are
// destroyed.
func TestReplace(t *testing.T) {
	e := newEnv(t, 3, 2)
	oc := e.operatorClient()
	d := tpmtest.NewBootDigests("image-1")
	// One simulated TPM at a time in a process: each machine is booted,
	// used and shut down in turn.
	a := e.boot(1, d, attester.EKRSA)
	provision(t, e, a, d)
	oldID := a.c.ID()
	a.shutdown()
	e.opAll("POST", api.PathAppliances+oldID+"/endpoints", api.EndpointsRequest{Endpoints: []string{"10.0.2.2:40001"}})
	ids := map[int64]string{}
	for _, seed := range []int64{2, 3} { // B, the twin; C, the new server
		app := e.boot(seed, d, attester.EKRSA)
		e.enroll(app)
		ids[seed] = app.c.ID()
		app.shutdown()
	}
	newID := ids[3]

	var pending, cDisks atomic.Int64
	// attestOnce boots machine seed, attests with its health, shuts down.
	attestOnce := func(seed int64) {
		app := e.boot(seed, d, attester.EKRSA)
		defer app.shutdown()
		if seed == 2 {
			app.c.ReportHealth(func() *api.Health {
				return &api.Health{Peers: []api.PeerHealth{{ID: newID, Path: "10.0.2.2:40001", PendingObjects: int(pending.Load()), PendingBytes: pending.Load() << 20}}}
			})
		} else {
			app.c.ReportHealth(func() *api.Health {
				var disks []api.DiskHealth
				for range cDisks.Load() {
					disks = append(disks, api.DiskHealth{Serial: "C-DISK", State: "ok"})
				}
				return &api.Health{Disks: disks}
			})
		}
		res, err := app.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 2)
		if err != nil {
			t.Errorf("machine %d: %v", seed, err)
		}
		attest.Round(res).WipeShares()
	}
	// replace runs Replace while B and C attest in turn, as they would
	// every interval.
	replace := func(opts opclient.ReplaceOptions) (*opclient.ReplaceReport, error) {
		var rep *opclient.ReplaceReport
		var err error
		done := make(chan struct{})
		go func() {
			defer close(done)
			rep, err = oc.Replace(context.Background(), oldID, newID, opts)
		}()
		for {
			select {
			case <-done:
				return rep, err
			default:
			}
			attestOnce(3)
			attestOnce(2)
		}
	}

	opts := opclient.ReplaceOptions{Threshold: 2, CatchUp: 1500 * time.Millisecond, Poll: 50 * time.Millisecond, Settle: 300 * time.Millisecond}
	pending.Store(3)
	rep, err := replace(opts)
	if !errors.Is(err, opclient.ErrNotCaughtUp) {
		t.Fatalf("replace before C caught up: %v, want %v", err, opclient.ErrNotCaughtUp)
	}
	if rep.Disks != 1 || !slices.Equal(rep.Endpoints, []string{"10.0.2.2:40001"}) {
		t.Fatalf("report %+v", rep)
	}
	for i := range e.brokers {
		old, nw := e.applianceState(i, oldID), e.applianceState(i, newID)
		if old.Revoked || len(old.Disks) != 1 {
			t.Fatalf("broker %d: A changed before C caught up: %+v", i, old)
		}
		if nw.DiskApprovals != 1 || !slices.Equal(nw.Endpoints, []string{"10.0.2.2:40001"}) {
			t.Fatalf("broker %d: C not prepared: approvals %d, endpoints %v", i, nw.DiskApprovals, nw.Endpoints)
		}
	}

	// C's disk is in service and B has sent it everything.
	cDisks.Store(1)
	pending.Store(0)
	opts.CatchUp = 30 * time.Second
	rep, err = replace(opts)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.CaughtUp || rep.Decommission == nil || len(rep.Decommission.Disks) != 1 || !rep.Decommission.Disks[0].Unreadable {
		t.Fatalf("report %+v %+v", rep, rep.Decommission)
	}
	for i := range e.brokers {
		if old := e.applianceState(i, oldID); !old.Revoked || len(old.Disks) != 0 {
			t.Fatalf("broker %d: A after the replacement: revoked %v, disks %v", i, old.Revoked, old.Disks)
		}
	}
}

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

// replaceFixture is an old server A (provisioned, its last health report
// made, dead), its twin B and the new server C (both enrolled), on three
// brokers with k=2.
type replaceFixture struct {
	e            *env
	oc           *opclient.Client
	oldID, newID string
	twinID       string
	pending      atomic.Int64 // objects B still has for C (a MiB each)
	cDisks       atomic.Int64 // disks C reports in service
}

// newReplaceFixture provisions A and has it report oldHealth (nil: no
// report) at every broker before it dies.
func newReplaceFixture(t *testing.T, oldHealth *api.Health) *replaceFixture {
	f := &replaceFixture{e: newEnv(t, 3, 2)}
	e := f.e
	f.oc = e.operatorClient()
	d := tpmtest.NewBootDigests("image-1")
	// One simulated TPM at a time in a process: each machine is booted,
	// used and shut down in turn.
	a := e.boot(1, d, attester.EKRSA)
	provision(t, e, a, d)
	f.oldID = a.c.ID()
	if oldHealth != nil {
		a.c.ReportHealth(func() *api.Health { h := *oldHealth; return &h })
		res, err := a.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 3)
		if err != nil {
			t.Fatal(err)
		}
		attest.Round(res).WipeShares()
	}
	a.shutdown()
	e.opAll("POST", api.PathAppliances+f.oldID+"/endpoints", api.EndpointsRequest{Endpoints: []string{"10.0.2.2:40001"}})
	ids := map[int64]string{}
	for _, seed := range []int64{2, 3} { // B, the twin; C, the new server
		app := e.boot(seed, d, attester.EKRSA)
		e.enroll(app)
		ids[seed] = app.c.ID()
		app.shutdown()
	}
	f.twinID, f.newID = ids[2], ids[3]
	return f
}

// attestOnce boots machine seed (2: B, 3: C), attests with its health and
// shuts it down.
func (f *replaceFixture) attestOnce(t *testing.T, seed int64) {
	app := f.e.boot(seed, tpmtest.NewBootDigests("image-1"), attester.EKRSA)
	defer app.shutdown()
	if seed == 2 {
		app.c.ReportHealth(func() *api.Health {
			return &api.Health{Peers: []api.PeerHealth{{ID: f.newID, Path: "10.0.2.2:40001", PendingObjects: int(f.pending.Load()), PendingBytes: f.pending.Load() << 20}}}
		})
	} else {
		app.c.ReportHealth(func() *api.Health {
			var disks []api.DiskHealth
			for range f.cDisks.Load() {
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

// replace runs Replace while B and C attest in turn, as they would every
// interval.
func (f *replaceFixture) replace(t *testing.T, opts opclient.ReplaceOptions) (*opclient.ReplaceReport, error) {
	var rep *opclient.ReplaceReport
	var err error
	done := make(chan struct{})
	go func() {
		defer close(done)
		rep, err = f.oc.Replace(context.Background(), f.oldID, f.newID, opts)
	}()
	for {
		select {
		case <-done:
			return rep, err
		default:
		}
		f.attestOnce(t, 3)
		f.attestOnce(t, 2)
	}
}

// oldUntouched fails the test unless A is unrevoked and holds its disk
// share at every broker, and no broker ever revoked anything or
// destroyed a share.
func (f *replaceFixture) oldUntouched(t *testing.T) {
	t.Helper()
	for i := range f.e.brokers {
		old := f.e.applianceState(i, f.oldID)
		revokes, destructions := f.e.countAudit(i, "revoke", "ok"), f.e.countAudit(i, "destroy-shares", "ok")
		if old.Revoked || len(old.Disks) != 1 || revokes != 0 || destructions != 0 {
			t.Errorf("%s: A changed: revoked %v, disks %v, %d revocations, %d share destructions",
				f.e.brokers[i].name, old.Revoked, old.Disks, revokes, destructions)
		}
	}
}

// oldDecommissioned fails the test unless A is revoked, and its shares
// destroyed, at every broker.
func (f *replaceFixture) oldDecommissioned(t *testing.T) {
	t.Helper()
	for i := range f.e.brokers {
		if old := f.e.applianceState(i, f.oldID); !old.Revoked || len(old.Disks) != 0 {
			t.Errorf("%s: A after the replacement: revoked %v, disks %v", f.e.brokers[i].name, old.Revoked, old.Disks)
		}
	}
}

// replicated is A's last report when its twin held everything it stored.
func replicated() *api.Health {
	return &api.Health{Peers: []api.PeerHealth{{ID: "twin", Path: "10.0.2.2:40002"}}}
}

// TestReplace: old server A (provisioned, dead; its last report showed
// nothing pending to its twin) is replaced by C, enrolled at home. C gets
// as many disk approvals as A had and A's endpoints at every broker; A is
// left alone while C has not caught up (its twin B still has objects for
// it); once C reports its disks healthy and B has nothing pending for C,
// A is revoked everywhere and its shares are destroyed.
func TestReplace(t *testing.T) {
	f := newReplaceFixture(t, replicated())
	opts := opclient.ReplaceOptions{Threshold: 2, CatchUp: 1500 * time.Millisecond, Poll: 50 * time.Millisecond, Settle: 300 * time.Millisecond}
	f.pending.Store(3)
	rep, err := f.replace(t, opts)
	if !errors.Is(err, opclient.ErrNotCaughtUp) {
		t.Fatalf("replace before C caught up: %v, want %v", err, opclient.ErrNotCaughtUp)
	}
	if rep.Disks != 1 || !slices.Equal(rep.Endpoints, []string{"10.0.2.2:40001"}) {
		t.Fatalf("report %+v", rep)
	}
	f.oldUntouched(t)
	for i := range f.e.brokers {
		if nw := f.e.applianceState(i, f.newID); nw.DiskApprovals != 1 || !slices.Equal(nw.Endpoints, []string{"10.0.2.2:40001"}) {
			t.Fatalf("broker %d: C not prepared: approvals %d, endpoints %v", i, nw.DiskApprovals, nw.Endpoints)
		}
	}

	// C's disk is in service and B has sent it everything.
	f.cDisks.Store(1)
	f.pending.Store(0)
	opts.CatchUp = 30 * time.Second
	rep, err = f.replace(t, opts)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.CaughtUp || rep.Decommission == nil || len(rep.Decommission.Disks) != 1 || !rep.Decommission.Disks[0].Unreadable {
		t.Fatalf("report %+v %+v", rep, rep.Decommission)
	}
	if !rep.OldUnreplicated.Clear || rep.OldUnreplicated.Bytes != 0 {
		t.Fatalf("A's unreplicated data: %s", rep.OldUnreplicated)
	}
	f.oldDecommissioned(t)
}

// TestReplaceNeedsKBrokers is the catch-up from a rogue broker's side:
// broker-a answers the operators fresh reports that say C has its disk in
// service and B has sent C everything, while the honest brokers see B
// still holding objects for C. A is not decommissioned: no broker revokes
// it or destroys a share, and the error names the brokers that disagree.
func TestReplaceNeedsKBrokers(t *testing.T) {
	f := newReplaceFixture(t, replicated())
	f.cDisks.Store(1)
	f.pending.Store(3)
	f.e.forgeHealth(0, func(ap *api.Appliance) {
		switch ap.ID {
		case f.newID:
			ap.Health = &api.Health{Reported: time.Now().UTC(), Disks: []api.DiskHealth{{Serial: "C-DISK", State: "ok"}}}
		case f.twinID:
			ap.Health = &api.Health{Reported: time.Now().UTC(), Peers: []api.PeerHealth{{ID: f.newID, Path: "10.0.2.2:40001"}}}
		}
	})
	opts := opclient.ReplaceOptions{Threshold: 2, CatchUp: 2 * time.Second, Poll: 50 * time.Millisecond, Settle: 300 * time.Millisecond}
	rep, err := f.replace(t, opts)
	if !errors.Is(err, opclient.ErrNotCaughtUp) {
		t.Fatalf("replace on one broker's word: %v, want %v", err, opclient.ErrNotCaughtUp)
	}
	f.oldUntouched(t)
	last := rep.CatchUp[len(rep.CatchUp)-1]
	if last.ApplianceID != f.twinID || last.Holds || last.Agreeing() != 1 {
		t.Fatalf("the twin's agreement: %s", last)
	}
	for _, want := range []string{"broker-b disagrees", "broker-c disagrees"} {
		if !slices.ContainsFunc(last.Dissent(), func(s string) bool { return len(s) >= len(want) && s[:len(want)] == want }) {
			t.Errorf("%s does not name %q", last, want)
		}
	}
}

// TestReplaceOldServerPending: A's last reports showed data its twin did
// not hold yet (or nothing at all, or only a rogue broker says its twin
// held everything). Replace refuses to decommission it, with the bytes
// and when it said so, and no broker revokes it or destroys a share;
// with AcceptLoss it goes ahead and the report keeps the figure.
func TestReplaceOldServerPending(t *testing.T) {
	const pending = 5 << 20
	behind := &api.Health{Peers: []api.PeerHealth{{ID: "twin", Path: "10.0.2.2:40002", PendingObjects: 5, PendingBytes: pending}}}
	tests := []struct {
		name       string
		last       *api.Health // A's last report at every broker
		rogueClear bool        // broker-a forges one that shows nothing pending
		acceptLoss bool
		wantErr    bool
		wantKnown  bool
		wantBytes  int64
	}{
		{name: "5 MiB pending", last: behind, wantErr: true, wantKnown: true, wantBytes: pending},
		{name: "5 MiB pending, loss accepted", last: behind, acceptLoss: true, wantKnown: true, wantBytes: pending},
		{name: "no report at all", wantErr: true},
		{name: "a report without peers", last: &api.Health{}, wantErr: true},
		{name: "rogue says nothing pending, two honest say 5 MiB", last: behind, rogueClear: true, wantErr: true, wantKnown: true, wantBytes: pending},
		{name: "control: nothing pending", last: replicated(), wantKnown: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newReplaceFixture(t, tc.last)
			if tc.rogueClear {
				f.e.forgeHealth(0, func(ap *api.Appliance) {
					if ap.ID == f.oldID {
						ap.Health = &api.Health{Reported: time.Now().UTC(), Peers: []api.PeerHealth{{ID: "twin", Path: "10.0.2.2:40002"}}}
					}
				})
			}
			f.cDisks.Store(1)
			opts := opclient.ReplaceOptions{Threshold: 2, CatchUp: 30 * time.Second, Poll: 50 * time.Millisecond, Settle: 200 * time.Millisecond,
				AcceptLoss: tc.acceptLoss}
			rep, err := f.replace(t, opts)
			if !rep.CaughtUp {
				t.Fatalf("C did not catch up: %v", err)
			}
			u := rep.OldUnreplicated
			if wantClear := tc.wantKnown && tc.wantBytes == 0; u == nil || u.Clear != wantClear || u.Known != tc.wantKnown || u.Bytes != tc.wantBytes || tc.wantKnown && u.AsOf.IsZero() {
				t.Fatalf("A's unreplicated data: %+v, want known %v, %d bytes, as of a time", u, tc.wantKnown, tc.wantBytes)
			}
			if tc.wantErr {
				var ue *opclient.UnreplicatedError
				if !errors.Is(err, opclient.ErrUnreplicated) || !errors.As(err, &ue) || ue.Unreplicated != u {
					t.Fatalf("replace: %v, want %v", err, opclient.ErrUnreplicated)
				}
				if rep.Decommission != nil {
					t.Fatal("a decommission report for a refused replacement")
				}
				f.oldUntouched(t)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if rep.Decommission == nil || rep.Decommission.Pending != tc.wantBytes {
				t.Fatalf("decommission report %+v, want %d bytes pending", rep.Decommission, tc.wantBytes)
			}
			f.oldDecommissioned(t)
		})
	}
}

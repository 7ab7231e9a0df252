package broker_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/operator/opclient"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// TestDecommission: an appliance whose twin still lacks data is not
// revoked when the drain runs out; once its health (reported at an
// attestation after the decommission began) shows nothing pending, it is
// revoked at every broker, every broker destroys its shares, the report
// names the disk by serial as unreadable, and the appliance's next
// attestation is a lockdown with no share in it. With a broker down,
// that broker is named as a possible holder, and the disk is unreadable
// only while fewer than k may hold a share.
func TestDecommission(t *testing.T) {
	e := newEnv(t, 3, 2)
	oc := e.operatorClient()
	d := tpmtest.NewBootDigests("image-1")
	a := e.boot(1, d, attester.EKRSA)
	defer a.shutdown()
	provision(t, e, a, d)
	id := a.c.ID()
	var mu sync.Mutex
	pending := int64(5 << 20)
	// The disk is looked up once, here: the health report is also made by
	// a round's late attestations, which may still run while the test's
	// clean-up stops the brokers.
	var disk string
	for _, dk := range e.applianceState(0, id).Disks {
		disk = dk
	}
	a.c.ReportHealth(func() *api.Health {
		mu.Lock()
		defer mu.Unlock()
		return &api.Health{Reported: time.Now(), Disks: []api.DiskHealth{{Serial: "EMBASSY-D1", UUID: disk, State: "ok"}},
			Peers: []api.PeerHealth{{ID: "b", PendingObjects: int(pending >> 20), PendingBytes: pending}}}
	})
	// The appliance attests on, as it would every re-attestation interval.
	ctx, stop := context.WithCancel(context.Background())
	var lockdown error
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			res, err := a.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 2)
			var ld *attest.LockdownError
			if errors.As(err, &ld) {
				lockdown = err
				return
			}
			attest.Round(res).WipeShares()
			time.Sleep(50 * time.Millisecond)
		}
	}()
	defer func() { stop(); <-done }()

	opts := opclient.DecommissionOptions{Threshold: 2, Drain: 500 * time.Millisecond, Poll: 50 * time.Millisecond}
	if _, err := oc.Decommission(context.Background(), id, opts); !errors.Is(err, opclient.ErrNotDrained) {
		t.Fatalf("decommission with 5 MiB pending: %v, want %v", err, opclient.ErrNotDrained)
	}
	for i := range e.brokers {
		if st := e.applianceState(i, id); st.Revoked || len(st.Disks) != 1 {
			t.Fatalf("broker %d changed by an undrained decommission: %+v", i, st)
		}
	}

	mu.Lock()
	pending = 0
	mu.Unlock()
	opts.Drain = 10 * time.Second
	rep, err := oc.Decommission(context.Background(), id, opts)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Drained || len(rep.Disks) != 1 || rep.Disks[0].Serial != "EMBASSY-D1" || !rep.Disks[0].Unreadable || len(rep.Disks[0].Holders) != 0 {
		t.Fatalf("report %+v", rep)
	}
	for i := range e.brokers {
		if st := e.applianceState(i, id); !st.Revoked || len(st.Disks) != 0 {
			t.Fatalf("broker %d after decommission: revoked %v, disks %v", i, st.Revoked, st.Disks)
		}
		if n := e.countAudit(i, "destroy-shares", "ok"); n != 1 {
			t.Errorf("broker %d audits %d share destructions", i, n)
		}
	}
	<-done
	if lockdown == nil {
		t.Fatal("the decommissioned appliance was not told to lock down")
	}
}

// TestDecommissionBrokerDown: a broker that cannot be reached keeps its
// share as far as the report knows; the disk is reported unreadable only
// if fewer than k brokers may still hold one.
func TestDecommissionBrokerDown(t *testing.T) {
	tests := []struct {
		name       string
		down       []int
		unreadable bool
	}{
		{"one of three down, k=2", []int{2}, true},
		{"two of three down, k=2", []int{1, 2}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, 3, 2)
			oc := e.operatorClient()
			d := tpmtest.NewBootDigests("image-1")
			a := e.boot(1, d, attester.EKRSA)
			defer a.shutdown()
			provision(t, e, a, d)
			for _, i := range tc.down {
				e.stop(i)
			}
			rep, err := oc.Decommission(context.Background(), a.c.ID(), opclient.DecommissionOptions{Threshold: 2, Force: true})
			if err == nil {
				t.Fatal("decommission with brokers down reported no error")
			}
			if len(rep.Disks) != 1 || rep.Disks[0].Unreadable != tc.unreadable || len(rep.Disks[0].Holders) != len(tc.down) {
				t.Fatalf("report %+v", rep.Disks)
			}
			if rep.Drained {
				t.Fatal("forced decommission reported drained")
			}
		})
	}
}

// TestDecommissionNeedsKBrokers is the drain from a rogue broker's side:
// broker-a answers the operators a fresh health report that says the
// appliance is drained. Its word alone, or with reports that do not count
// (stale, or an appliance with no peers), revokes nothing and destroys no
// share at any broker; the error names the brokers that did not agree.
// The controls show that k agreeing fresh reports do decommission, and
// that a rogue broker that disagrees cannot stop them.
func TestDecommissionNeedsKBrokers(t *testing.T) {
	const mib = 1 << 20
	tests := []struct {
		name string
		// forge is broker-a's forged report: "drained", "pending" or "".
		forge string
		// lag: brokers whose clocks run 1.5 s behind (their reports are
		// 1.5 s old when made; the bound is 1 s).
		lag []int
		// noPeers: the appliance reports no peer; pending is what it
		// reports pending to its peer otherwise.
		noPeers bool
		pending int64
		force   bool
		wantErr error // nil: decommissioned
		// wantDissent are the brokers named as not agreeing.
		wantDissent []string
		wantDrained bool
	}{
		{name: "rogue says drained, two honest see 5 MiB pending", forge: "drained", pending: 5 * mib,
			wantErr: opclient.ErrNotDrained, wantDissent: []string{"broker-b disagrees", "broker-c disagrees"}},
		{name: "rogue says drained, two honest say drained but stale", forge: "drained", lag: []int{1, 2},
			wantErr: opclient.ErrNotDrained, wantDissent: []string{"broker-b stale", "broker-c stale"}},
		{name: "rogue says drained, the appliance has no peers", forge: "drained", noPeers: true,
			wantErr: opclient.ErrNoPeers},
		{name: "no peers, no force", noPeers: true, wantErr: opclient.ErrNoPeers},
		{name: "no peers, forced", noPeers: true, force: true},
		{name: "control: rogue says drained, two honest agree", forge: "drained", wantDrained: true},
		{name: "control: rogue says pending, two honest see drained", forge: "pending", wantDrained: true,
			wantDissent: []string{"broker-a disagrees"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, 3, 2)
			for _, i := range tc.lag {
				e.lagClock(i, 1500*time.Millisecond)
			}
			oc := e.operatorClient()
			d := tpmtest.NewBootDigests("image-1")
			a := e.boot(1, d, attester.EKRSA)
			defer a.shutdown()
			provision(t, e, a, d)
			id := a.c.ID()
			disk := e.applianceState(0, id).Disks[0]
			a.c.ReportHealth(func() *api.Health {
				h := &api.Health{Disks: []api.DiskHealth{{Serial: "EMBASSY-D1", UUID: disk, State: "ok"}}}
				if !tc.noPeers {
					h.Peers = []api.PeerHealth{{ID: "twin", Path: "10.0.2.2:9443", PendingObjects: int(tc.pending / mib), PendingBytes: tc.pending}}
				}
				return h
			})
			// Every broker holds a report before the decommission begins.
			res, err := a.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 3)
			if err != nil {
				t.Fatal(err)
			}
			attest.Round(res).WipeShares()
			if tc.forge != "" {
				e.forgeHealth(0, func(ap *api.Appliance) {
					if ap.ID != id {
						return
					}
					h := &api.Health{Reported: time.Now().UTC(), Disks: []api.DiskHealth{{Serial: "FORGED", UUID: disk, State: "ok"}},
						Peers: []api.PeerHealth{{ID: "twin", Path: "10.0.2.2:9443"}}}
					if tc.forge == "pending" {
						h.Peers[0].PendingObjects, h.Peers[0].PendingBytes = 1, mib
					}
					ap.Health = h
				})
			}
			// The appliance attests on, as it would every re-attestation
			// interval, until it is told to lock down.
			ctx, stop := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() {
				defer close(done)
				for ctx.Err() == nil {
					res, err := a.c.AttestAll(ctx, fastRetry, 2)
					var ld *attest.LockdownError
					if errors.As(err, &ld) {
						return
					}
					attest.Round(res).WipeShares()
					time.Sleep(50 * time.Millisecond)
				}
			}()
			defer func() { stop(); <-done }()

			opts := opclient.DecommissionOptions{Threshold: 2, Drain: 3 * time.Second, Force: tc.force, Poll: 50 * time.Millisecond}
			if tc.lag != nil {
				opts.MaxReportAge = time.Second
			}
			rep, err := oc.Decommission(context.Background(), id, opts)
			for i := range e.brokers {
				st := e.applianceState(i, id)
				revokes, destructions := e.countAudit(i, "revoke", "ok"), e.countAudit(i, "destroy-shares", "ok")
				if tc.wantErr != nil && (st.Revoked || len(st.Disks) != 1 || revokes != 0 || destructions != 0) {
					t.Errorf("%s after a refused decommission: revoked %v, disks %v, %d revocations, %d share destructions",
						e.brokers[i].name, st.Revoked, st.Disks, revokes, destructions)
				}
				if tc.wantErr == nil && (!st.Revoked || len(st.Disks) != 0 || revokes != 1 || destructions != 1) {
					t.Errorf("%s after the decommission: revoked %v, disks %v, %d revocations, %d share destructions",
						e.brokers[i].name, st.Revoked, st.Disks, revokes, destructions)
				}
			}
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) || !errors.Is(err, opclient.ErrNotDrained) {
					t.Fatalf("decommission: %v, want %v", err, tc.wantErr)
				}
			} else if err != nil {
				t.Fatalf("decommission: %v", err)
			}
			if len(tc.wantDissent) > 0 {
				dissent := rep.Drain.Dissent()
				if tc.wantErr != nil {
					var ae *opclient.AgreementError
					if !errors.As(err, &ae) {
						t.Fatalf("%v names no broker", err)
					}
					dissent = ae.Agreement.Dissent()
				}
				for _, want := range tc.wantDissent {
					if !slices.ContainsFunc(dissent, func(s string) bool { return strings.HasPrefix(s, want) }) {
						t.Errorf("dissent %q does not name %q", dissent, want)
					}
				}
			}
			if tc.wantErr == nil {
				if rep.Drained != tc.wantDrained || len(rep.Disks) != 1 || !rep.Disks[0].Unreadable {
					t.Fatalf("report: drained %v, disks %+v", rep.Drained, rep.Disks)
				}
				// One broker's forged serial does not name the disk.
				if rep.Disks[0].Serial != "EMBASSY-D1" {
					t.Errorf("disk serial %q, want the one k brokers agree on", rep.Disks[0].Serial)
				}
			}
		})
	}
}

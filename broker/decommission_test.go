package broker_test

import (
	"context"
	"errors"
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
			rep, err := oc.Decommission(context.Background(), a.c.ID(), opclient.DecommissionOptions{Threshold: 2})
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

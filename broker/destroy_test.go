package broker_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/operator/opclient"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// TestDestroyShares: an operator shreds a revoked appliance's shares. Asked
// before the revocation every broker refuses (not_revoked) and nothing
// changes; after it, every broker deletes the shares of both disks, says
// which, audits them with the operator, and keeps the revoked record with
// no disk. Even with its revocation edited away in the database, the
// appliance's attestation then releases nothing.
func TestDestroyShares(t *testing.T) {
	e := newEnv(t, 2, 2)
	oc := e.operatorClient()
	ctx := context.Background()

	d := tpmtest.NewBootDigests("image-1")
	a := e.boot(1, d, attester.EKRSA)
	defer a.shutdown()
	provision(t, e, a, d)
	id := a.c.ID()
	// A second disk.
	e.opAll(http.MethodPost, api.PathAppliances+id+"/disks", api.DiskApprovalRequest{Count: 1})
	results, err := a.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 2)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.c.Deposit(ctx, results, "disk-2", bytes.Repeat([]byte{7}, 32)); err != nil {
		t.Fatal(err)
	}
	wantDisks := []string{"disk-1", "disk-2"}

	// Not revoked: refused everywhere, nothing changes.
	before := []api.Appliance{e.applianceState(0, id), e.applianceState(1, id)}
	ds, err := oc.DestroyShares(ctx, id)
	var be *opclient.BrokerError
	if !errors.As(err, &be) || be.Code != api.CodeNotRevoked {
		t.Fatalf("destroy before revoking: %v, want code %s", err, api.CodeNotRevoked)
	}
	for i, d := range ds {
		if d.OK || d.Code != api.CodeNotRevoked || len(d.Destroyed) != 0 {
			t.Errorf("broker %d: %+v", i, d)
		}
		if after := e.applianceState(i, id); !reflect.DeepEqual(after, before[i]) {
			t.Errorf("broker %d's record changed:\nbefore %+v\nafter  %+v", i, before[i], after)
		}
		if ent := e.lastAudit(i, "destroy-shares"); ent.Result != "fail" || ent.Reason != broker.ReasonNotRevoked || ent.Appliance != id {
			t.Errorf("broker %d audit %+v", i, ent)
		}
	}
	a.reboot(t, d)
	results, err = a.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 2)
	if err != nil {
		t.Fatal(err)
	}
	if keys, err := attest.Round(results).Keys(2); err != nil || len(keys) != 2 {
		t.Fatalf("after the refused destruction: %d keys, %v", len(keys), err)
	}

	// Revoked: every broker destroys both disks' shares.
	if _, err := oc.Revoke(ctx, id); err != nil {
		t.Fatal(err)
	}
	ds, err = oc.DestroyShares(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	opclient.PrintDestructions(&out, ds)
	t.Logf("embassyctl revoke --destroy-shares:\n%s", out.String())
	for i, d := range ds {
		if !d.OK || !slices.Equal(slices.Sorted(slices.Values(d.Destroyed)), wantDisks) {
			t.Errorf("broker %d: %+v, want %v destroyed", i, d, wantDisks)
		}
		st := e.applianceState(i, id)
		if !st.Revoked || len(st.Disks) != 0 || st.Floor != before[i].Floor || st.ResetCount < before[i].ResetCount {
			t.Errorf("broker %d's record after destruction: %+v", i, st)
		}
		ent := e.lastAudit(i, "destroy-shares")
		if ent.Result != "ok" || ent.Appliance != id || ent.Actor == nil || *ent.Actor != operatorActor(e.opCert) {
			t.Errorf("broker %d audit %+v", i, ent)
		}
		if got := strings.Split(ent.Detail["disks"], ","); !slices.Equal(slices.Sorted(slices.Values(got)), wantDisks) {
			t.Errorf("broker %d audit names disks %v, want %v", i, got, wantDisks)
		}
	}
	if !strings.Contains(out.String(), "disk-1, disk-2") {
		t.Errorf("rendering does not list the disks:\n%s", out.String())
	}
	// Again: nothing left, and it says so.
	var again api.DestroySharesResponse
	if err := e.op(1, http.MethodPost, api.PathAppliances+id+"/destroy-shares", struct{}{}, &again); err != nil || len(again.Destroyed) != 0 {
		t.Fatalf("second destruction: %+v, %v", again, err)
	}

	// Un-revoke broker 0's record behind its back: no share is left in the
	// database to release.
	e.stop(0)
	db, err := bolt.Open(filepath.Join(e.brokers[0].dir, "broker.db"), 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		c := tx.Bucket([]byte("shares")).Cursor()
		for k, _ := c.First(); k != nil; k, _ = c.Next() {
			if strings.HasPrefix(string(k), id+"/") {
				t.Errorf("share %s still stored", k)
			}
		}
		apps := tx.Bucket([]byte("appliances"))
		var rec map[string]any
		if err := json.Unmarshal(apps.Get([]byte(id)), &rec); err != nil {
			return err
		}
		rec["revoked"] = false
		b, _ := json.Marshal(rec)
		return apps.Put([]byte(id), b)
	})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	e.start(0)
	a.reboot(t, d)
	resp, err := rawAttest(t, e, a, 0, nil)
	if err != nil {
		t.Fatalf("attestation of the un-revoked record: %v", err)
	}
	if len(resp.Shares) != 0 {
		t.Fatalf("%d shares released after destruction", len(resp.Shares))
	}
}

package qemutests

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/operator/opclient"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
	"github.com/dataembassy/embassy/qemu-tests/vm"
)

// revokedRecord is what one revocation of a serving appliance showed, for
// the scenarios about it.
type revokedRecord struct {
	// servingMissing names the volume keys a dump of the serving
	// appliance's memory did not hold (each must be there, inside
	// dm-crypt: the control that shows the search finds what is there).
	servingMissing []string
	// servingFound is every share or passphrase that dump held.
	servingFound []string
	// lockdownReason is the reason the appliance gave for its lockdown.
	lockdownReason string
	// stopped is the appliance's own account of closing its volumes
	// (the MsgStopped line's fields).
	stopped map[string]any
	// keysRemain are console lines saying a volume key stayed in the
	// kernel.
	keysRemain []string
	// afterFound is every volume key, passphrase or share a dump after
	// the lockdown (PID 1 started afresh and refused again) held.
	afterFound []string
	// decommission is the operators' report; sharesLeft the disks each
	// broker still holds shares of afterwards, by broker; unlockedAfter
	// are console lines of a volume unlocked after the lockdown.
	decommission    *opclient.DecommissionReport
	decommissionErr error
	sharesLeft      map[string][]string
	unlockedAfter   []string
	// provisionedDisks are the ids of the disks the appliance had.
	provisionedDisks []string
}

// revoked runs the revocation once per test binary: twin-a serving
// ingest is decommissioned by the operators (drained, revoked at every
// broker, its shares destroyed); at its next re-attestation it goes
// into lockdown, stops serving, closes its LUKS mappings and starts
// afresh, to be refused again. Its memory is dumped while serving and
// after the lockdown.
var revoked struct {
	mu  sync.Mutex
	rec *revokedRecord
}

func revokeServingAppliance(t *testing.T) *revokedRecord {
	t.Helper()
	requireE2E(t)
	revoked.mu.Lock()
	defer revoked.mu.Unlock()
	if revoked.rec != nil {
		return revoked.rec
	}
	defer slotsForRun(t, 1, 55*time.Second)()
	defer timeSharedRun("revocation run (TestRevokedAppliance, TestKeysGoneAfterLockdown, TestDecommission)")()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	hb, cfg, id := provisioned(t, "revoke")
	rec := &revokedRecord{}
	volumeKeys, held, all := map[string][]byte{}, map[string][]byte{}, map[string][]byte{}
	for _, d := range provisionedEmbassy(t).secrets[twinNames[0]] {
		volumeKeys["volume key of "+d.uuid] = d.volumeKey
		all["volume key of "+d.uuid] = d.volumeKey
		held["passphrase of "+d.uuid] = d.passphrase
		for i, s := range d.shares {
			held[fmt.Sprintf("share %d of %s", i, d.uuid)] = s
		}
	}
	for k, v := range held {
		all[k] = v
	}
	cfg.Name = "revoke-boot"
	v := startVM(t, cfg)
	i, _ := waitMsg(t, ctx, v, 0, logmsg.MsgServing)
	serving := dumpMemory(t, v, "serving")
	for name := range volumeKeys {
		if len(findSecrets(serving, map[string][]byte{name: volumeKeys[name]})) == 0 {
			rec.servingMissing = append(rec.servingMissing, name)
		}
	}
	rec.servingFound = findSecrets(serving, held)
	serving = nil

	for _, d := range provisionedEmbassy(t).secrets[twinNames[0]] {
		rec.provisionedDisks = append(rec.provisionedDisks, d.uuid)
	}
	rec.decommission, rec.decommissionErr = hb.ops.Decommission(ctx, id,
		opclient.DecommissionOptions{Threshold: 2, Drain: 2 * time.Minute, Progress: testWriter{t}})
	if rec.decommissionErr != nil {
		t.Fatalf("decommission: %v", rec.decommissionErr)
	}
	j, ld := waitMsg(t, ctx, v, i, logmsg.MsgLockdown)
	rec.lockdownReason, _ = ld["reason"].(string)
	k, stopped := waitMsg(t, ctx, v, j, logmsg.MsgStopped)
	rec.stopped = stopped
	for _, l := range v.Lines()[j:] {
		if bootreport.JSONMsg(l.Text) == logmsg.MsgKeysRemain {
			rec.keysRemain = append(rec.keysRemain, l.Text)
		}
	}
	noIngest(t, cfg)
	// PID 1 starts afresh (its old memory freed) and is refused again.
	k, _ = waitMsg(t, ctx, v, k, logmsg.MsgStarting)
	waitMsg(t, ctx, v, k, logmsg.MsgLockdown)
	rec.afterFound = findSecrets(dumpMemory(t, v, "after-lockdown"), all)
	for _, l := range v.Lines()[j:] {
		if bootreport.JSONMsg(l.Text) == "volume unlocked and mounted" {
			rec.unlockedAfter = append(rec.unlockedAfter, l.Text)
		}
	}
	rec.sharesLeft = map[string][]string{}
	for _, st := range hb.ops.Status(ctx) {
		if st.Error != "" {
			t.Fatalf("broker %s: %s", st.Broker, st.Error)
		}
		for _, a := range st.State.Appliances {
			if a.ID == id {
				rec.sharesLeft[st.Broker] = a.Disks
			}
		}
	}
	revoked.rec = rec
	return rec
}

// TestRevokedAppliance: an appliance serving ingest is revoked; at its
// next re-attestation it goes into lockdown, stops serving, closes its LUKS
// mappings, drops its keys and starts afresh (refused again). "Keys
// dropped" is checked from outside the guest: a dump of its memory while
// serving holds each disk's volume key (inside dm-crypt, where it must be:
// this shows the search finds it), and a dump after the lockdown holds no
// volume key, passphrase or share in any form.
func TestRevokedAppliance(t *testing.T) {
	parallelReader(t)
	rec := revokeServingAppliance(t)
	if len(rec.servingMissing) > 0 {
		t.Fatalf("not in the serving appliance's memory: %v: the search proves nothing", rec.servingMissing)
	}
	if rec.lockdownReason != "appliance revoked" {
		t.Fatalf("lockdown reason %q", rec.lockdownReason)
	}
	if len(rec.keysRemain) > 0 || rec.stopped["all_keys_gone"] != true {
		t.Fatalf("volume keys left in the kernel: %v %v", rec.keysRemain, rec.stopped)
	}
	closed, _ := rec.stopped["closed"].([]any)
	dropped, _ := rec.stopped["key_dropped"].([]any)
	if len(closed)+len(dropped) != 2 {
		t.Fatalf("the stop line accounts for %d mappings, want both disks': %v", len(closed)+len(dropped), rec.stopped)
	}
	if len(rec.afterFound) > 0 {
		t.Fatalf("after the lockdown the appliance's memory still holds: %v", rec.afterFound)
	}
}

// TestKeysGoneAfterLockdown: the same revocation, read for the keys. While
// the appliance serves, its memory holds the volume keys (dm-crypt needs
// them; the control) but no share and no passphrase: those were combined,
// used and wiped. After the lockdown it holds none of them, searched raw,
// in hex and in base64.
func TestKeysGoneAfterLockdown(t *testing.T) {
	parallelReader(t)
	rec := revokeServingAppliance(t)
	if len(rec.servingMissing) > 0 {
		t.Fatalf("not in the serving appliance's memory: %v: the search proves nothing", rec.servingMissing)
	}
	if len(rec.servingFound) > 0 {
		t.Errorf("while serving, the appliance's memory holds: %v", rec.servingFound)
	}
	if len(rec.afterFound) > 0 {
		t.Errorf("after the lockdown the appliance's memory still holds: %v", rec.afterFound)
	}
}

// dumpMemory reads the guest's RAM as someone with the machine in hand
// would, and returns it.
func dumpMemory(t testing.TB, v *vm.VM, label string) []byte {
	t.Helper()
	p := filepath.Join(t.TempDir(), label+".mem")
	if err := v.DumpMemory(p); err != nil {
		t.Fatalf("dump guest memory: %v", err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(p)
	return b
}

// testWriter writes progress lines to the test log.
type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Logf("%s", strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// TestDecommission: the same serving appliance, decommissioned by the
// operators: drained first, then revoked and its shares destroyed at every
// broker. It locks down; started afresh it is refused again and unlocks
// nothing; no broker holds a share of its disks any more, and the report
// names both disks, by serial, as unreadable for good.
func TestDecommission(t *testing.T) {
	parallelReader(t)
	rec := revokeServingAppliance(t)
	r := rec.decommission
	if !r.Drained {
		t.Fatalf("not drained: %+v", r)
	}
	if len(r.Disks) != len(rec.provisionedDisks) {
		t.Fatalf("report names %d disks, the appliance had %d: %+v", len(r.Disks), len(rec.provisionedDisks), r.Disks)
	}
	for _, d := range r.Disks {
		if !d.Unreadable || d.Serial == "" || len(d.Holders) != 0 || !slices.Contains(rec.provisionedDisks, d.ID) {
			t.Errorf("disk %+v: want one of %v, by serial, unreadable, no holder", d, rec.provisionedDisks)
		}
	}
	for _, o := range r.Revoked {
		if !o.OK {
			t.Errorf("revoke at %s: %s", o.Broker, o.Error)
		}
	}
	if len(rec.sharesLeft) != 3 {
		t.Fatalf("brokers that know the appliance: %v", rec.sharesLeft)
	}
	for b, disks := range rec.sharesLeft {
		if len(disks) != 0 {
			t.Errorf("broker %s still holds shares of %v", b, disks)
		}
	}
	if rec.lockdownReason != "appliance revoked" {
		t.Fatalf("lockdown reason %q", rec.lockdownReason)
	}
	if len(rec.unlockedAfter) > 0 {
		t.Fatalf("a volume unlocked after the decommission: %v", rec.unlockedAfter)
	}
}

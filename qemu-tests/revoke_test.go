package qemutests

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
	"github.com/dataembassy/embassy/qemu-tests/vm"
)

// TestRevokedAppliance: an appliance serving ingest is revoked; at its
// next re-attestation it goes into lockdown, stops serving, closes its LUKS
// mappings, drops its keys and starts afresh (refused again). "Keys
// dropped" is checked from outside the guest: a dump of its memory while
// serving holds each disk's volume key (inside dm-crypt, where it must be:
// this shows the search finds it), and a dump after the lockdown holds no
// volume key, passphrase or share in any form.
func TestRevokedAppliance(t *testing.T) {
	requireE2E(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	hb, cfg, id := provisioned(t, "revoke")
	disks := provisionedEmbassy(t).secrets[twinNames[0]]
	volumeKeys, all := map[string][]byte{}, map[string][]byte{}
	for _, d := range disks {
		volumeKeys["volume key of "+d.uuid] = d.volumeKey
		all["volume key of "+d.uuid] = d.volumeKey
		all["passphrase of "+d.uuid] = d.passphrase
		for i, s := range d.shares {
			all[fmt.Sprintf("share %d of %s", i, d.uuid)] = s
		}
	}
	cfg.Name = "revoke-boot"
	v := startVM(t, cfg)
	i, _ := waitMsg(t, ctx, v, 0, logmsg.MsgServing)
	serving := dumpMemory(t, v, "serving")
	for name := range volumeKeys {
		if len(findSecrets(serving, map[string][]byte{name: volumeKeys[name]})) == 0 {
			t.Fatalf("the %s is not in the serving appliance's memory: the search proves nothing", name)
		}
	}
	serving = nil

	for _, b := range hb.b {
		if err := b.Revoke(id); err != nil {
			t.Fatal(err)
		}
	}
	j, ld := waitMsg(t, ctx, v, i, logmsg.MsgLockdown)
	if ld["reason"] != "appliance revoked" {
		t.Fatalf("lockdown reason %v", ld["reason"])
	}
	k, _ := waitMsg(t, ctx, v, j, logmsg.MsgStopped)
	for _, l := range v.Lines()[j:] {
		if bootreport.JSONMsg(l.Text) == "closing volumes" {
			t.Fatalf("volumes did not close cleanly: %s", l.Text)
		}
	}
	noIngest(t, cfg)
	// PID 1 starts afresh (its old memory freed) and is refused again.
	k, _ = waitMsg(t, ctx, v, k, logmsg.MsgStarting)
	waitMsg(t, ctx, v, k, logmsg.MsgLockdown)
	if found := findSecrets(dumpMemory(t, v, "after-lockdown"), all); len(found) > 0 {
		t.Fatalf("after the lockdown the appliance's memory still holds: %v", found)
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

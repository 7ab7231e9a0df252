package qemutests

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/images/build"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
	"github.com/dataembassy/embassy/qemu-tests/vm"
)

// waitMsg waits for a structured log line with msg on v's console (from
// line index from) and fails the test if the appliance halts first.
func waitMsg(t testing.TB, ctx context.Context, v *vm.VM, from int, msg string) (int, map[string]any) {
	t.Helper()
	i, line, err := v.WaitFor(ctx, from, func(s string) bool {
		m := bootreport.JSONMsg(s)
		return m == msg || m == logmsg.MsgHalted
	})
	if err != nil {
		t.Fatalf("waiting for %q: %v", msg, err)
	}
	var fields map[string]any
	json.Unmarshal([]byte(line.Text), &fields)
	if fields["msg"] == logmsg.MsgHalted {
		t.Fatalf("appliance halted: %s", line.Text)
	}
	return i, fields
}

// TestProvisionThenUnlock: a fresh server with two blank disks is enrolled
// and its disks approved; it provisions both (GPT, LUKS2, ext4, shares to
// all three brokers), opens the mirrored store, and after a reboot with the
// same disks and TPM unlocks them with the released shares, with no
// operator action.
func TestProvisionThenUnlock(t *testing.T) {
	requireE2E(t)
	dir := imageDir()
	m := loadImage(t, dir)
	hb := startHostBrokers(t)
	cfg := bootConfig(t, "disks", dir, m)
	cfg.StateDir = t.TempDir() // the same TPM and NVRAM across both boots
	cfg.Disks = []string{rawDisk(t, 256<<20), rawDisk(t, 256<<20)}
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()

	v := startVM(t, cfg)
	_, id := waitMsg(t, ctx, v, 0, logmsg.MsgIdentity)
	appliance := id["appliance_id"].(string)
	waitMsg(t, ctx, v, 0, logmsg.MsgEnrollRequested)
	mb, _ := os.ReadFile(filepath.Join(dir, build.ManifestFile))
	sb, _ := os.ReadFile(filepath.Join(dir, build.SignatureFile))
	for _, b := range hb.b {
		if err := b.ApproveEnrollment(appliance); err != nil {
			t.Fatal(err)
		}
		if _, err := b.ApproveManifest(mb, sb); err != nil {
			t.Fatal(err)
		}
		if err := b.ApproveDisks(appliance, 2); err != nil {
			t.Fatal(err)
		}
	}
	_, st := waitMsg(t, ctx, v, 0, logmsg.MsgStoreOpen)
	if n, _ := st["disks"].(float64); n != 2 || st["degraded"] != false {
		t.Fatalf("first boot store: %v", st)
	}
	for _, b := range hb.b {
		s, _ := b.State()
		if len(s.Appliances) != 1 || len(s.Appliances[0].Disks) != 2 {
			t.Fatalf("%s holds shares for %v", b.Name(), s.Appliances)
		}
	}
	v.Close()

	// Power on again: attest, get the shares, unlock, no operator action.
	cfg.Name = "disks-reboot"
	v2 := startVM(t, cfg)
	_, att := waitMsg(t, ctx, v2, 0, logmsg.MsgAttested)
	if n, _ := att["shares"].(float64); n < 4 {
		t.Fatalf("second boot got %v shares, want 2 disks x k=2", att["shares"])
	}
	_, st = waitMsg(t, ctx, v2, 0, logmsg.MsgStoreOpen)
	if n, _ := st["disks"].(float64); n != 2 || st["degraded"] != false {
		t.Fatalf("second boot store: %v", st)
	}
}

package qemutests

import (
	"context"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
)

// TestRevokedAppliance: an appliance serving ingest is revoked; at its
// next re-attestation it goes into lockdown, stops serving, closes its LUKS
// mappings and drops its keys.
func TestRevokedAppliance(t *testing.T) {
	requireE2E(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	hb := startHostBrokers(t)
	cfg, id := provisioned(t, ctx, hb, "revoke")
	cfg.Name = "revoke-boot"
	v := startVM(t, cfg)
	i, _ := waitMsg(t, ctx, v, 0, logmsg.MsgServing)
	for _, b := range hb.b {
		if err := b.Revoke(id); err != nil {
			t.Fatal(err)
		}
	}
	j, ld := waitMsg(t, ctx, v, i, logmsg.MsgLockdown)
	if ld["reason"] != "appliance revoked" {
		t.Fatalf("lockdown reason %v", ld["reason"])
	}
	_, stopped := waitMsg(t, ctx, v, j, logmsg.MsgStopped)
	for _, l := range v.Lines()[j:] {
		if bootreport.JSONMsg(l.Text) == "closing volumes" {
			t.Fatalf("volumes did not close cleanly: %s", l.Text)
		}
	}
	_ = stopped
	noIngest(t, cfg)
}

package qemutests

import (
	"context"
	"crypto/tls"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/images/build"
	"github.com/dataembassy/embassy/operator/opclient"
)

// upgradableTwins boots both appliances of a copied provisioned embassy,
// each from its own writable copy of embassy.img with guest reboots
// allowed (an upgrade writes the boot disk and reboots), and waits until
// both serve and know each other.
func upgradableTwins(t *testing.T, ctx context.Context, hb *hostBrokers, dir string) (*twin, *twin) {
	t.Helper()
	var tws []*twin
	for _, name := range twinNames {
		tw := restTwin(t, hb, dir, name)
		boot := filepath.Join(dir, name, "boot.img")
		if out, err := exec.Command("cp", "--sparse=always", filepath.Join(imageDir(), build.DiskFile), boot).CombinedOutput(); err != nil {
			t.Fatalf("copy the boot disk: %v\n%s", err, out)
		}
		tw.cfg.BootDisk, tw.cfg.BootDiskWritable, tw.cfg.AllowReboot = boot, true, true
		tw.v = startVM(t, tw.cfg)
		tws = append(tws, tw)
	}
	for _, tw := range tws {
		waitMsg(t, ctx, tw.v, 0, logmsg.MsgServing)
	}
	for i, tw := range tws {
		waitPeer(t, ctx, tw, tws[1-i].id)
	}
	return tws[0], tws[1]
}

// upgradeTwin pushes img to tw, as `embassyctl upgrade` does once the
// image is approved, and follows it: staged, rebooted at a quiet moment,
// the new image started from the trial slot, committed to slot A and
// serving, and every broker saw it attest on the new version and raised
// its floor.
func upgradeTwin(t *testing.T, ctx context.Context, hb *hostBrokers, tw *twin, img *opclient.UpgradeImage, client tls.Certificate) {
	t.Helper()
	start := time.Now()
	from := len(tw.v.Lines())
	resp, err := opclient.PushUpgrade(ctx, fmt.Sprintf("127.0.0.1:%d", tw.ports[0]), tw.id, img, client, applianceIDs(t))
	if err != nil {
		t.Fatalf("push to %s: %v", tw.name, err)
	}
	if resp.Staged != img.Version || len(resp.ApprovedAt) != len(hb.b) {
		t.Fatalf("%s: %+v", tw.name, resp)
	}
	i, _ := waitMsg(t, ctx, tw.v, from, logmsg.MsgUpgradeRebooting)
	i, started := waitMsg(t, ctx, tw.v, i, logmsg.MsgStarting)
	if v, _ := started["image_version"].(float64); uint64(v) != img.Version {
		t.Fatalf("%s rebooted into image %v, want %d", tw.name, started["image_version"], img.Version)
	}
	i, _ = waitMsg(t, ctx, tw.v, i, logmsg.MsgUpgradeCommitted)
	waitMsg(t, ctx, tw.v, i, logmsg.MsgServing)
	for _, p := range hb.ops.Progress(ctx, tw.id) {
		if p.Error != "" || p.Running != img.Version || p.Floor != img.Version {
			t.Fatalf("%s at %s: running %d, floor %d (%s); want %d and %d", tw.name, p.Broker, p.Running, p.Floor, p.Error, img.Version, img.Version)
		}
	}
	t.Logf("%s upgraded to image %d in %.1fs", tw.name, img.Version, time.Since(start).Seconds())
}

// TestUpgradeRaisesFloor: twins on image 1 with data. Image 2 is approved
// at every broker and pushed to A: A writes it to its trial slot, reboots
// into it through BootNext, attests, commits it to slot A and serves
// again with all its data; every broker raised A's floor to 2 (audited).
// B is upgraded the same way; `restic check --read-data` passes on both.
// Then A's old image (image 1's disk, as someone with the old boot medium
// would boot it) gets no keys at any broker: below the floor.
func TestUpgradeRaisesFloor(t *testing.T) {
	requireE2E(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	v1 := loadImage(t, imageDir())
	img, err := opclient.LoadUpgradeImage(buildImageVersion(t, v1, 2))
	if err != nil {
		t.Fatal(err)
	}
	hb, dir := copyEmbassy(t)
	a, b := upgradableTwins(t, ctx, hb, dir)
	hc := ingestHTTP(t, "home-state-auditor")

	ra := newResticClient(t, a.ports[0], "population-registry")
	mustRestic(t, ra, "init")
	mustRestic(t, ra, "backup", randomTree(t, 3, 1<<20))
	waitConverged(t, ctx, hc, a, b)
	operator := newResticClient(t, a.ports[0], "home-state-operator")
	client, err := tls.LoadX509KeyPair(operator.certFile, operator.certFile)
	if err != nil {
		t.Fatal(err)
	}

	outs, err := hb.ops.ApproveImage(ctx, img.Manifest, img.Signature)
	if err != nil {
		t.Fatalf("approve image 2: %v %+v", err, outs)
	}
	upgradeTwin(t, ctx, hb, a, img, client)
	snapshots := mustRestic(t, ra, "snapshots")
	mustRestic(t, ra, "check", "--read-data")
	upgradeTwin(t, ctx, hb, b, img, client)
	rb := newResticClient(t, b.ports[0], "population-registry")
	mustRestic(t, rb, "check", "--read-data")
	if got := mustRestic(t, rb, "snapshots"); strings.Count(got, "\n") < strings.Count(snapshots, "\n") {
		t.Fatalf("B lists fewer snapshots than A:\n%s\n%s", got, snapshots)
	}
	for i, br := range hb.b {
		n := 0
		entries, _, err := br.Audit()
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			if e.Event == "raise-floor" && e.Detail["to"] == "2" && (e.Appliance == a.id || e.Appliance == b.id) {
				n++
			}
		}
		if n != 2 {
			t.Errorf("broker %d audited %d floor raises to 2 for the twins, want 2", i, n)
		}
	}

	// A's old image: the v1 disk with A's TPM and data disks.
	a.v.Close()
	old := a.cfg
	old.Name, old.BootDisk, old.BootDiskWritable, old.AllowReboot = "twin-a-v1", filepath.Join(imageDir(), build.DiskFile), false, false
	v := startVM(t, old)
	requireNoKeys(t, hb, v, old, a.id, broker.ReasonFloor)
}

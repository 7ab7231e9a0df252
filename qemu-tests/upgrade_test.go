package qemutests

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/config"
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
	return startTwinsWith(t, ctx, hb, dir, func(tw *twin) {
		boot := filepath.Join(dir, tw.name, "boot.img")
		if out, err := exec.Command("cp", "--sparse=always", filepath.Join(imageDir(), build.DiskFile), boot).CombinedOutput(); err != nil {
			t.Fatalf("copy the boot disk: %v\n%s", err, out)
		}
		tw.cfg.BootDisk, tw.cfg.BootDiskWritable, tw.cfg.AllowReboot = boot, true, true
	})
}

// pushUpgrade pushes img to tw, as `embassyctl upgrade` does once the
// image is approved, and returns where tw's console stood before.
func pushUpgrade(t *testing.T, ctx context.Context, hb *hostBrokers, tw *twin, img *opclient.UpgradeImage, client tls.Certificate) int {
	t.Helper()
	from := len(tw.v.Lines())
	resp, err := opclient.PushUpgrade(ctx, fmt.Sprintf("127.0.0.1:%d", tw.ports[0]), tw.id, img, client, applianceIDs(t))
	if err != nil {
		t.Fatalf("push image %d to %s: %v", img.Version, tw.name, err)
	}
	if resp.Staged != img.Version || len(resp.ApprovedAt) != len(hb.b) {
		t.Fatalf("%s: %+v", tw.name, resp)
	}
	return from
}

// followUpgrade follows tw from its console line from after a push of
// img: rebooted at a quiet moment, the new image started from the trial
// slot, committed to slot A and serving, and every broker saw it attest
// on the new version and raised its floor.
func followUpgrade(t *testing.T, ctx context.Context, hb *hostBrokers, tw *twin, from int, img *opclient.UpgradeImage) {
	t.Helper()
	start := time.Now()
	i, _ := waitMsg(t, ctx, tw.v, from, logmsg.MsgUpgradeRebooting)
	rebootAt := tw.v.Lines()[i].At
	i, started := waitMsg(t, ctx, tw.v, i, logmsg.MsgStarting)
	t.Logf("%s: from the reboot to embassy-init of the new image %.1fs", tw.name, tw.v.Lines()[i].At.Sub(rebootAt).Seconds())
	if v, _ := started["image_version"].(float64); uint64(v) != img.Version {
		t.Fatalf("%s rebooted into image %v, want %d", tw.name, started["image_version"], img.Version)
	}
	i, _ = waitMsg(t, ctx, tw.v, i, logmsg.MsgUpgradeCommitted)
	waitMsg(t, ctx, tw.v, i, logmsg.MsgServing)
	// The floor rises at the first attestation that reports the image
	// committed (a re-attestation, every 10 s here).
	for deadline := time.Now().Add(90 * time.Second); ; time.Sleep(2 * time.Second) {
		prog := hb.ops.Progress(ctx, tw.id)
		if opclient.Upgraded(prog, img.Version, len(hb.b)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not every broker saw image %d and raised the floor: %+v", tw.name, img.Version, prog)
		}
	}
	t.Logf("%s upgraded to image %d, serving %.1fs after the push", tw.name, img.Version, time.Since(start).Seconds())
}

// upgradeRecord is what the upgrade run showed, for the scenarios about it.
type upgradeRecord struct {
	// floorRaises counts, per broker, the audited raises of the twins'
	// floors to 2.
	floorRaises []int
	// brokenTrial is twin-a's console from the push of the broken image 3
	// until it served again; floorsAfter are its floors at every broker
	// then, and attestedOn3 the brokers that saw an attestation on image 3.
	brokenTrial []string
	floorsAfter []uint64
	attestedOn3 []string
	// checkedAfter says restic check --read-data passed on A after it
	// came back.
	checkedAfter bool
}

var upgraded struct {
	mu  sync.Mutex
	rec *upgradeRecord
}

// upgradeRun runs once per test binary: twins on image 1 with data; image
// 2 approved at every broker and pushed to A (it writes it to its trial
// slot, reboots into it through BootNext, attests, commits it to slot A
// and serves again with its data; restic check --read-data). Then, at the
// same time, image 2 to B the same way, and a broken image 3 (approved,
// but its image config points at no broker, so it can never attest) to A,
// which boots it once, gives up after its trial timeout and reboots into
// image 2 by itself. Last, A's old image 1 disk is booted with A's TPM
// and data disks.
func upgradeRun(t *testing.T) *upgradeRecord {
	t.Helper()
	requireE2E(t)
	upgraded.mu.Lock()
	defer upgraded.mu.Unlock()
	if upgraded.rec != nil {
		return upgraded.rec
	}
	defer slotsForRun(t, 2, 240*time.Second)()
	defer timeSharedRun("upgrade run (TestUpgradeRaisesFloor, TestUpgradeThatFailsRollsBack)")()
	rec := &upgradeRecord{}
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	v1 := loadImage(t, imageDir())
	img, err := opclient.LoadUpgradeImage(buildImageVersion(t, v1, 2))
	if err != nil {
		t.Fatal(err)
	}
	// Image 3's config: brokers nowhere (a broken build), a short trial.
	broken := filepath.Join(t.TempDir(), "broken-config.json")
	cfg := localConfig(t)
	for i := range cfg.Brokers {
		for j := range cfg.Brokers[i].Endpoints {
			cfg.Brokers[i].Endpoints[j] = strings.Replace(cfg.Brokers[i].Endpoints[j], ":744", ":745", 1)
		}
	}
	cfg.TrialTimeoutSeconds = 30
	b, err := cfg.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(broken, b, 0o644)
	img3, err := opclient.LoadUpgradeImage(buildImageVersion(t, v1, 3, "--config", broken))
	if err != nil {
		t.Fatal(err)
	}

	hb, dir := copyEmbassy(t)
	a, tb := upgradableTwins(t, ctx, hb, dir)
	hc := ingestHTTP(t, "home-state-auditor")
	ra := newResticClient(t, a.ports[0], "population-registry")
	mustRestic(t, ra, "init")
	mustRestic(t, ra, "backup", randomTree(t, 3, 1<<20))
	waitConverged(t, ctx, hc, a, tb)
	operator := newResticClient(t, a.ports[0], "home-state-operator")
	client, err := tls.LoadX509KeyPair(operator.certFile, operator.certFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, im := range []*opclient.UpgradeImage{img, img3} {
		if outs, err := hb.ops.ApproveImage(ctx, im.Manifest, im.Signature); err != nil {
			t.Fatalf("approve image %d: %v %+v", im.Version, err, outs)
		}
	}

	// Image 2 on A; then, at the same time, image 2 on B and the broken
	// image 3 on A.
	followUpgrade(t, ctx, hb, a, pushUpgrade(t, ctx, hb, a, img, client), img)
	snapshots := mustRestic(t, ra, "snapshots")
	mustRestic(t, ra, "check", "--read-data")
	since := time.Now()
	fromA := pushUpgrade(t, ctx, hb, a, img3, client)
	fromB := pushUpgrade(t, ctx, hb, tb, img, client)
	followUpgrade(t, ctx, hb, tb, fromB, img)
	rb := newResticClient(t, tb.ports[0], "population-registry")
	mustRestic(t, rb, "check", "--read-data")
	if got := mustRestic(t, rb, "snapshots"); strings.Count(got, "\n") < strings.Count(snapshots, "\n") {
		t.Fatalf("B lists fewer snapshots than A:\n%s\n%s", got, snapshots)
	}
	for _, br := range hb.b {
		n := 0
		entries, _, err := br.Audit()
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			if e.Event == "raise-floor" && e.Detail["to"] == "2" && (e.Appliance == a.id || e.Appliance == tb.id) {
				n++
			}
		}
		rec.floorRaises = append(rec.floorRaises, n)
	}

	// The broken image 3 on A: staged, booted once, given up, back on 2.
	i, _ := waitMsg(t, ctx, a.v, fromA, logmsg.MsgTrialFailed)
	i, _ = waitMsg(t, ctx, a.v, i, logmsg.MsgStarting)
	waitMsg(t, ctx, a.v, i, logmsg.MsgServing)
	for _, l := range a.v.Lines()[fromA:] {
		rec.brokenTrial = append(rec.brokenTrial, l.Text)
	}
	for _, p := range hb.ops.Progress(ctx, a.id) {
		rec.floorsAfter = append(rec.floorsAfter, p.Floor)
	}
	for _, br := range hb.b {
		entries, _, err := br.Audit()
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			if e.Appliance == a.id && !e.Time.Before(since) && e.Event == "attest" && e.Result == "ok" && e.Detail["image_version"] == "3" {
				rec.attestedOn3 = append(rec.attestedOn3, br.Name())
			}
		}
	}
	mustRestic(t, ra, "check", "--read-data")
	rec.checkedAfter = true

	// A's old image: the image 1 disk with A's TPM and data disks.
	a.v.Close()
	old := a.cfg
	old.Name, old.BootDisk, old.BootDiskWritable, old.AllowReboot = "twin-a-v1", filepath.Join(imageDir(), build.DiskFile), false, false
	v := startVM(t, old)
	requireNoKeys(t, hb, v, old, a.id, broker.ReasonFloor)
	upgraded.rec = rec
	return rec
}

// localConfig is the image config the local-default image is built with.
func localConfig(t testing.TB) *config.Config {
	t.Helper()
	f, err := os.Open(filepath.Join(repoRoot, "images", "local", "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	c, err := config.Parse(f)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestUpgradeRaisesFloor: twins on image 1 with data; image 2 approved at
// every broker and pushed to A: A writes it to its trial slot, reboots
// into it through BootNext, attests, commits it to slot A and serves again
// with all its data, and every broker raised A's floor to 2 (audited); B
// is upgraded the same way; restic check --read-data passes on both.
// A's old image (image 1's disk, as someone with the old boot medium would
// boot it) then gets no keys at any broker: below the floor.
func TestUpgradeRaisesFloor(t *testing.T) {
	parallelReader(t)
	rec := upgradeRun(t)
	for i, n := range rec.floorRaises {
		if n != 2 {
			t.Errorf("%s audited %d floor raises to 2 for the twins, want 2", brokerNames[i], n)
		}
	}
}

// TestUpgradeThatFailsRollsBack: a broken image 3 (approved, but its
// config reaches no broker, so it can never attest) is pushed to A, which
// runs image 2: A writes it to the trial slot and boots it once; image 3
// gives up after its trial timeout and reboots; the firmware boots slot A,
// image 2, which serves again by itself with its data (restic check
// --read-data); no broker saw image 3 attest, and A's floor is still 2.
func TestUpgradeThatFailsRollsBack(t *testing.T) {
	parallelReader(t)
	rec := upgradeRun(t)
	var versions []float64
	trial, gaveUp := false, false
	for _, l := range rec.brokenTrial {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) != nil {
			continue
		}
		switch m["msg"] {
		case logmsg.MsgStarting:
			v, _ := m["image_version"].(float64)
			versions = append(versions, v)
		case "boot slot":
			if len(versions) == 1 && m["trial"] == true {
				trial = true
			}
		case logmsg.MsgTrialFailed:
			gaveUp = true
		}
	}
	if !slices.Equal(versions, []float64{3, 2}) || !trial || !gaveUp {
		t.Fatalf("A started images %v (trial boot %v, gave up %v), want 3 from the trial slot, then 2", versions, trial, gaveUp)
	}
	if len(rec.attestedOn3) != 0 {
		t.Fatalf("brokers saw image 3 attest: %v", rec.attestedOn3)
	}
	for i, f := range rec.floorsAfter {
		if f != 2 {
			t.Errorf("%s: floor %d after the failed upgrade, want 2", brokerNames[i], f)
		}
	}
	if !rec.checkedAfter {
		t.Fatal("restic check did not run after A came back")
	}
}

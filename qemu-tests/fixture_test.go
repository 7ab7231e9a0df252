package qemutests

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/images/build"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
	"github.com/dataembassy/embassy/qemu-tests/vm"
)

// A provisioned embassy is what most scenarios start from: three brokers
// that enrolled two appliances (twin-a, twin-b), approved the image and
// hold the shares of their disks; each appliance with its TPM, its VARS and
// two provisioned 512 MiB disks, after one boot that reached "ingest
// serving" and knew its peer. Making it costs a first boot with enrollment,
// provisioning and share deposits; it is made once per test binary, kept
// at rest (VMs off, brokers closed) and copied for every scenario, which
// then boots straight to serving. Destructive scenarios change only their
// copy.
type embassyAtRest struct {
	dir     string // brokers/<i>, twin-a/{state,disk0.img,disk1.img}, twin-b/...
	masters [][]byte
	ids     map[string]string // appliance name -> id
	// evidence of twin-a's first boot, for the measured-boot checks.
	evidence *bootreport.Evidence
	// secrets of each appliance's disks (by name), as the tests know them.
	secrets map[string][]diskSecrets
	// firstBoot is the record of the first boot, read by the scenarios
	// about enrollment and provisioning.
	firstBoot firstBootRecord
}

// firstBootRecord is what the provisioned embassy's first boot left: each
// appliance's console, when the operators approved, and each broker's
// state once both appliances served.
type firstBootRecord struct {
	consoles map[string][]vm.Line // appliance name -> console lines
	approved time.Time            // the operators' first approval
	brokers  []*api.State
	// tpmBus is what crossed each appliance's TPM bus during the first
	// boot (enrollment, provisioning, share deposits), both directions.
	tpmBus map[string]tpmBusRecord
}

// fixtureDiskSize is the size of every provisioned data disk.
const fixtureDiskSize = 512 << 20

// twinNames are the appliances of the provisioned embassy.
var twinNames = [2]string{"twin-a", "twin-b"}

var fixture struct {
	once sync.Once
	root string // set by TestMain; removed when the binary ends
	at   *embassyAtRest
	err  error
}

// provisionedEmbassy returns the embassy at rest, making it on first use.
// Its time is printed once, as a scenario of its own.
func provisionedEmbassy(t testing.TB) *embassyAtRest {
	t.Helper()
	requireE2E(t)
	fixture.once.Do(func() {
		start := time.Now()
		fixture.err = errors.New("making the provisioned embassy failed (see the first test that asked for it)")
		fixture.at = makeEmbassy(t, filepath.Join(fixture.root, "embassy"))
		fixture.err = nil
		reportScenarioTime("provisioned embassy (shared set-up)", time.Since(start), timedSetUp)
	})
	if fixture.at == nil {
		t.Fatal(fixture.err)
	}
	return fixture.at
}

// makeEmbassy boots twin-a and twin-b with blank disks, enrolls them with
// fresh brokers whose state lives under dir, approves the image and the
// disks, records their endpoints, waits until both serve and know each
// other, and puts everything at rest.
func makeEmbassy(t testing.TB, dir string) *embassyAtRest {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	at := &embassyAtRest{dir: dir, ids: map[string]string{}}
	state := brokerState{}
	for i := 0; i < 3; i++ {
		d := filepath.Join(dir, "brokers", fmt.Sprint(i))
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
		state.dirs = append(state.dirs, d)
	}
	state.masters = freshBrokerState(t).masters
	at.masters = state.masters
	hb := startHostBrokersFrom(t, state)
	defer hb.close()

	imgDir := imageDir()
	loadImage(t, imgDir) // the manifest verifies
	base := bootreport.BootConfig("embassy", imgDir)
	base.LogDir = filepath.Join(repoRoot, "out", "test-logs", "provisioned-embassy")
	os.RemoveAll(base.LogDir)
	base.SwtpmCA = filepath.Join(cacheDir(), "swtpm-localca")
	var tws []*twin
	for _, name := range twinNames {
		tw := &twin{name: name, cfg: base}
		tw.cfg.Name = name + "-first-boot"
		tw.cfg.RecordTPMBus = true
		tw.cfg.StateDir = filepath.Join(dir, name, "state")
		if err := os.MkdirAll(tw.cfg.StateDir, 0o700); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 2; i++ {
			p := filepath.Join(dir, name, fmt.Sprintf("disk%d.img", i))
			if err := os.WriteFile(p, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(p, fixtureDiskSize); err != nil {
				t.Fatal(err)
			}
			tw.cfg.Disks = append(tw.cfg.Disks, p)
		}
		tw.pickPorts(t)
		tw.v = startVM(t, tw.cfg)
		tws = append(tws, tw)
	}
	ev, err := bootreport.Wait(ctx, tws[0].v)
	if err != nil {
		t.Fatalf("evidence of the first boot: %v", err)
	}
	at.evidence = ev
	for _, tw := range tws {
		_, idf := waitMsg(t, ctx, tw.v, 0, logmsg.MsgIdentity)
		tw.id = idf["appliance_id"].(string)
		at.ids[tw.name] = tw.id
		waitMsg(t, ctx, tw.v, 0, logmsg.MsgEnrollRequested)
	}
	mb, _ := os.ReadFile(filepath.Join(imgDir, build.ManifestFile))
	sb, _ := os.ReadFile(filepath.Join(imgDir, build.SignatureFile))
	at.firstBoot.approved = time.Now()
	for _, b := range hb.b {
		if _, err := b.ApproveManifest(hb.op(b), mb, sb); err != nil {
			t.Fatal(err)
		}
		for _, tw := range tws {
			if err := b.ApproveEnrollment(hb.op(b), tw.id); err != nil {
				t.Fatal(err)
			}
			if err := b.SetEndpoints(hb.op(b), tw.id, tw.endpoints()); err != nil {
				t.Fatal(err)
			}
			if err := b.ApproveDisks(hb.op(b), tw.id, 2); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, tw := range tws {
		_, st := waitMsg(t, ctx, tw.v, 0, logmsg.MsgStoreOpen)
		if n, _ := st["disks"].(float64); n != 2 || st["degraded"] != false {
			t.Fatalf("%s: first boot store: %v", tw.name, st)
		}
		waitMsg(t, ctx, tw.v, 0, logmsg.MsgServing)
	}
	for i, tw := range tws {
		waitPeer(t, ctx, tw, tws[1-i].id)
	}
	at.firstBoot.consoles = map[string][]vm.Line{}
	at.firstBoot.tpmBus = map[string]tpmBusRecord{}
	for _, tw := range tws {
		at.firstBoot.consoles[tw.name] = tw.v.Lines()
		tw.v.Close()
		at.firstBoot.tpmBus[tw.name] = recordedTPMBus(t, tw.v)
	}
	for _, b := range hb.b {
		st, err := b.State()
		if err != nil {
			t.Fatal(err)
		}
		at.firstBoot.brokers = append(at.firstBoot.brokers, st)
	}
	at.secrets = map[string][]diskSecrets{}
	for _, tw := range tws {
		for _, a := range at.firstBoot.brokers[0].Appliances {
			if a.ID == tw.id {
				at.secrets[tw.name] = learnDiskSecrets(t, hb, a.Disks, tw.cfg.Disks)
			}
		}
		if len(at.secrets[tw.name]) != 2 {
			t.Fatalf("%s: the brokers hold shares of %d disks, want 2", tw.name, len(at.secrets[tw.name]))
		}
	}
	return at
}

// copyEmbassy copies the embassy at rest into a folder of the test, starts
// its brokers there, and returns them with the folder.
func copyEmbassy(t testing.TB) (*hostBrokers, string) {
	t.Helper()
	at := provisionedEmbassy(t)
	start := time.Now()
	os.RemoveAll(testLogDir(t))
	dst := filepath.Join(t.TempDir(), "embassy")
	hb := startHostBrokersFrom(t, at.copyTo(t, dst))
	t.Logf("provisioned embassy copied in %.1fs", time.Since(start).Seconds())
	return hb, dst
}

// copyTo copies the embassy at rest to dst and returns the brokers' state
// there.
func (at *embassyAtRest) copyTo(t testing.TB, dst string) brokerState {
	t.Helper()
	if out, err := exec.Command("cp", "-a", "--sparse=always", at.dir, dst).CombinedOutput(); err != nil {
		t.Fatalf("copy the provisioned embassy: %v\n%s", err, out)
	}
	state := brokerState{masters: at.masters}
	for i := 0; i < 3; i++ {
		state.dirs = append(state.dirs, filepath.Join(dst, "brokers", fmt.Sprint(i)))
	}
	return state
}

// restTwin returns the VM config of one appliance of a copied embassy, with
// fresh host ports for its two service forwards, recorded at the brokers
// as its endpoints (an operator's set-endpoints). The VM is not started.
func restTwin(t testing.TB, hb *hostBrokers, dir, name string) *twin {
	t.Helper()
	imgDir := imageDir()
	tw := &twin{name: name, id: provisionedEmbassy(t).ids[name]}
	tw.cfg = bootreport.BootConfig(name, imgDir)
	tw.cfg.LogDir = testLogDir(t)
	tw.cfg.SwtpmCA = filepath.Join(cacheDir(), "swtpm-localca")
	tw.cfg.StateDir = filepath.Join(dir, name, "state")
	tw.cfg.Disks = []string{filepath.Join(dir, name, "disk0.img"), filepath.Join(dir, name, "disk1.img")}
	tw.pickPorts(t)
	tw.cfg.GuestForwards = hb.guestForwards()
	for _, b := range hb.b {
		if err := b.SetEndpoints(hb.op(b), tw.id, tw.endpoints()); err != nil {
			t.Fatal(err)
		}
	}
	return tw
}

// pickPorts chooses the host ports of tw's two service forwards.
func (tw *twin) pickPorts(t testing.TB) {
	t.Helper()
	for i := range tw.ports {
		p, err := vm.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		tw.ports[i] = p
	}
	tw.cfg.Forwards = []vm.Forward{{NIC: 0, HostPort: tw.ports[0], GuestPort: 8443}, {NIC: 1, HostPort: tw.ports[1], GuestPort: 8443}}
}

// provisioned returns one provisioned appliance (twin-a of a copied
// embassy, its twin left off) with the brokers that know it, not started.
func provisioned(t testing.TB, name string) (*hostBrokers, vm.Config, string) {
	t.Helper()
	hb, dir := copyEmbassy(t)
	tw := restTwin(t, hb, dir, twinNames[0])
	tw.cfg.Name = name
	return hb, tw.cfg, tw.id
}

// consoleMsg returns the fields and time of the first structured line with
// msg in a recorded console, and fails the test if there is none or the
// appliance halted first.
func consoleMsg(t testing.TB, lines []vm.Line, msg string) (map[string]any, time.Time) {
	t.Helper()
	for _, l := range lines {
		switch bootreport.JSONMsg(l.Text) {
		case msg:
			var fields map[string]any
			if err := json.Unmarshal([]byte(l.Text), &fields); err != nil {
				t.Fatalf("%q line: %v", msg, err)
			}
			return fields, l.At
		case logmsg.MsgHalted:
			t.Fatalf("appliance halted before %q: %s", msg, l.Text)
		}
	}
	t.Fatalf("no %q line in the console", msg)
	return nil, time.Time{}
}

// consoleHas reports whether a recorded console has a structured line with
// msg whose field key is value.
func consoleHas(lines []vm.Line, msg, key, value string) bool {
	for _, l := range lines {
		if bootreport.JSONMsg(l.Text) != msg {
			continue
		}
		var fields map[string]any
		if json.Unmarshal([]byte(l.Text), &fields) == nil && fields[key] == value {
			return true
		}
	}
	return false
}

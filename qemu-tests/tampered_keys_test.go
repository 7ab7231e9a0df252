package qemutests

import (
	"bytes"
	"context"
	"crypto/tls"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/images/build"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
	"github.com/dataembassy/embassy/qemu-tests/vm"
)

// noIngest checks that nothing answers TLS on the ingest forward.
func noIngest(t testing.TB, cfg vm.Config) {
	t.Helper()
	if ingestAnswers(cfg) {
		t.Fatal("ingest answered TLS")
	}
}

// ingestAnswers tells whether anything answers TLS on the ingest forward.
func ingestAnswers(cfg vm.Config) bool {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(cfg.Forwards[0].HostPort))
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{InsecureSkipVerify: true})
	if err == nil {
		c.Close()
		return true
	}
	return false
}

// tamperedOutcome is what one boot of a tampered image on a provisioned
// appliance showed: the host's replay of its measured boot, and what every
// broker did for it from the moment the boot began.
type tamperedOutcome struct {
	verify   string // mkimage verify on the tampered folder
	verifyOK bool
	verdict  *bootreport.Verdict
	// refusedBy counts the brokers that audited an image refusal for the
	// appliance since the boot began.
	refusedBy int
	// released lists every "attest ok" or "release" entry any broker made
	// for the appliance since the boot began.
	released []string
	// further is a console line showing the appliance got past
	// attestation, if any.
	further        string
	ingestAnswered bool
}

// tampers change one part of a copy of the image, the way someone with the
// boot disk in hand would.
var tampers = map[string]func(t testing.TB, dir string){
	"kernel": func(t testing.TB, dir string) {
		p := filepath.Join(dir, build.KernelFile)
		b, _ := os.ReadFile(p)
		// A letter of the legacy setup's error text: still boots by EFI.
		i := bytes.Index(b[:0x1000], []byte("No setup signature"))
		if i < 0 {
			t.Fatal("marker text not in the kernel")
		}
		b[i+3] ^= 0x20
		os.WriteFile(p, b, 0o644)
	},
	"initramfs": func(t testing.TB, dir string) {
		tamperInitramfs(t, dir, "lib/modules/"+loadImage(t, imageDir()).Kernel.Release+"/modules.builtin")
	},
	"cmdline": func(t testing.TB, dir string) {
		p := filepath.Join(dir, build.CmdlineFile)
		b, _ := os.ReadFile(p)
		os.WriteFile(p, []byte(strings.TrimSuffix(string(b), "\n")+" init=/bin/sh\n"), 0o644)
	},
}

var tamperedBoots struct {
	mu sync.Mutex
	m  map[string]*tamperedRun
}

// tamperedRun is one kind's boot: its own lock, so that kinds boot side
// by side in the parallel phase.
type tamperedRun struct {
	mu sync.Mutex
	o  *tamperedOutcome
}

// tamperedBoot boots a copy of a provisioned appliance with the image
// tampered as kind says, once per test binary: the measured-boot verdict
// tests and the no-keys test read the same boot.
func tamperedBoot(t testing.TB, kind string) *tamperedOutcome {
	t.Helper()
	tamperedBoots.mu.Lock()
	if tamperedBoots.m == nil {
		tamperedBoots.m = map[string]*tamperedRun{}
	}
	run, ok := tamperedBoots.m[kind]
	if !ok {
		run = &tamperedRun{}
		tamperedBoots.m[kind] = run
	}
	tamperedBoots.mu.Unlock()
	run.mu.Lock()
	defer run.mu.Unlock()
	if run.o != nil {
		return run.o
	}
	defer slotsForRun(t, 1, 25*time.Second)()
	defer timeSharedRun("tampered boot: " + kind + " (TestBootTampered*, TestTamperedImageGetsNoKeys)")()
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	hb, cfg, id := provisioned(t, "tampered-"+kind)
	defer hb.close()
	dir := copyImage(t, imageDir())
	tampers[kind](t, dir)
	repackImage(t, dir)
	o := &tamperedOutcome{}
	o.verify, o.verifyOK = runVerify(t, dir)
	m := loadImage(t, imageDir())
	cfg.BootDisk = bootreport.BootConfig(cfg.Name, dir).BootDisk
	v := startVM(t, cfg)
	defer v.Close()
	ev, err := bootreport.Wait(ctx, v)
	if err != nil {
		t.Fatal(err)
	}
	if o.verdict, err = bootreport.Verify(ev, m.Measurements); err != nil {
		t.Fatalf("replay the guest's event log against its PCRs: %v", err)
	}
	waitMsg(t, ctx, v, 0, logmsg.MsgIdentity)
	since := v.Started.Add(-time.Second)
	// Give every broker time to refuse at least once; then read everything
	// each broker audited for the appliance since the boot began.
	o.refusedBy, o.released, _, _ = brokerVerdicts(t, hb, id, since, broker.ReasonImage)
	for _, l := range v.Lines() {
		switch bootreport.JSONMsg(l.Text) {
		case logmsg.MsgAttested, "volume unlocked and mounted", logmsg.MsgServing:
			o.further = l.Text
		}
	}
	o.ingestAnswered = ingestAnswers(cfg)
	run.o = o
	return o
}

// TestTamperedImageGetsNoKeys: a provisioned appliance booted with a
// changed kernel, initramfs or command line gets no shares: no broker
// audited an "attest ok" or a release for it from the moment the boot
// began, every broker audited the image refusal, its disks stay locked and
// it never serves ingest.
func TestTamperedImageGetsNoKeys(t *testing.T) {
	parallelReader(t)
	for _, kind := range []string{"kernel", "initramfs", "cmdline"} {
		t.Run(kind, func(t *testing.T) {
			o := tamperedBoot(t, kind)
			if len(o.released) > 0 {
				t.Fatalf("released to a tampered image: %v", o.released)
			}
			if o.refusedBy != 3 {
				t.Fatalf("only %d of 3 brokers audited %q", o.refusedBy, broker.ReasonImage)
			}
			if o.further != "" {
				t.Fatalf("tampered image got further than attestation: %s", o.further)
			}
			if o.ingestAnswered {
				t.Fatal("ingest answered TLS")
			}
		})
	}
}

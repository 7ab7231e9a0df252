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
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/images/build"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
	"github.com/dataembassy/embassy/qemu-tests/vm"
)

// provisioned boots a fresh server once with the brokers approving
// everything, so that it has provisioned disks and deposited shares, and
// returns its VM config (persistent TPM, disks, an ingest forward) and id.
func provisioned(t *testing.T, ctx context.Context, hb *hostBrokers, name string) (vm.Config, string) {
	t.Helper()
	dir := imageDir()
	m := loadImage(t, dir)
	port, err := vm.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	cfg := bootConfig(t, name, dir, m)
	cfg.StateDir = t.TempDir()
	cfg.Disks = []string{rawDisk(t, 256<<20), rawDisk(t, 256<<20)}
	cfg.Forwards = []vm.Forward{{NIC: 0, HostPort: port, GuestPort: 8443}}
	v := startVM(t, cfg)
	_, idf := waitMsg(t, ctx, v, 0, logmsg.MsgIdentity)
	id := idf["appliance_id"].(string)
	waitMsg(t, ctx, v, 0, logmsg.MsgEnrollRequested)
	mb, _ := os.ReadFile(filepath.Join(dir, build.ManifestFile))
	sb, _ := os.ReadFile(filepath.Join(dir, build.SignatureFile))
	for _, b := range hb.b {
		b.ApproveEnrollment(id)
		if _, err := b.ApproveManifest(mb, sb); err != nil {
			t.Fatal(err)
		}
		b.ApproveDisks(id, 2)
	}
	waitMsg(t, ctx, v, 0, logmsg.MsgServing)
	v.Close()
	return cfg, id
}

// noIngest checks that nothing answers TLS on the ingest forward.
func noIngest(t *testing.T, cfg vm.Config) {
	t.Helper()
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(cfg.Forwards[0].HostPort))
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{InsecureSkipVerify: true})
	if err == nil {
		c.Close()
		t.Fatal("ingest answered TLS")
	}
}

// TestTamperedImageGetsNoKeys: a provisioned appliance booted with a
// changed kernel, initramfs or command line gets no shares, keeps its disks
// locked and never serves ingest; every broker audits the reason.
func TestTamperedImageGetsNoKeys(t *testing.T) {
	requireE2E(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	hb := startHostBrokers(t)
	cfg, id := provisioned(t, ctx, hb, "tamper-keys")
	tampers := []struct {
		name   string
		change func(t *testing.T, dir string)
	}{
		{"kernel", func(t *testing.T, dir string) {
			p := filepath.Join(dir, build.KernelFile)
			b, _ := os.ReadFile(p)
			// A letter of the legacy setup's error text: still boots by EFI.
			i := bytes.Index(b[:0x1000], []byte("No setup signature"))
			if i < 0 {
				t.Fatal("marker text not in the kernel")
			}
			b[i+3] ^= 0x20
			os.WriteFile(p, b, 0o644)
		}},
		{"initramfs", func(t *testing.T, dir string) {
			tamperInitramfs(t, dir, "lib/modules/"+loadImage(t, imageDir()).Kernel.Release+"/modules.builtin")
		}},
		{"cmdline", func(t *testing.T, dir string) {
			p := filepath.Join(dir, build.CmdlineFile)
			b, _ := os.ReadFile(p)
			os.WriteFile(p, []byte(strings.TrimSuffix(string(b), "\n")+" embassy.debug=1\n"), 0o644)
		}},
	}
	for _, tc := range tampers {
		t.Run(tc.name, func(t *testing.T) {
			dir := copyImage(t, imageDir())
			tc.change(t, dir)
			m := loadImage(t, imageDir())
			c := cfg
			bc, err := bootreport.BootConfig("tampered-"+tc.name, dir, m)
			if err != nil {
				t.Fatal(err)
			}
			c.Name, c.Kernel, c.Initrd, c.Cmdline = bc.Name, bc.Kernel, bc.Initrd, bc.Cmdline
			c.LogDir = filepath.Join(repoRoot, "out", "test-logs", t.Name())
			v := startVM(t, c)
			waitMsg(t, ctx, v, 0, logmsg.MsgIdentity)
			// Give every broker time to refuse at least once.
			deadline := time.Now().Add(2 * time.Minute)
			for {
				refused := 0
				for _, b := range hb.b {
					entries, _, _ := b.Audit()
					for j := len(entries) - 1; j >= 0; j-- {
						e := entries[j]
						if e.Event == "attest" && e.Appliance == id {
							if e.Result == "fail" && e.Reason == broker.ReasonImage && e.Time.After(v.Started.Add(-time.Second)) {
								refused++
							}
							break
						}
					}
				}
				if refused == len(hb.b) {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("only %d brokers audited %q", refused, broker.ReasonImage)
				}
				time.Sleep(time.Second)
			}
			for _, l := range v.Lines() {
				switch bootreport.JSONMsg(l.Text) {
				case logmsg.MsgAttested, "volume unlocked and mounted", logmsg.MsgServing:
					t.Fatalf("tampered image got further than attestation: %s", l.Text)
				}
			}
			noIngest(t, c)
			v.Close()
		})
	}
}

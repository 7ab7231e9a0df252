package qemutests

import (
	"context"
	"crypto/sha256"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/images/build"
	"github.com/dataembassy/embassy/images/diskimage"
	"github.com/dataembassy/embassy/images/ovmfvars"
	"github.com/dataembassy/embassy/images/sbkeys"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
	"github.com/dataembassy/embassy/qemu-tests/vm"
)

// TestDiskImageBoots: the provisioned embassy's first boot (no boot of its
// own) came from embassy.img under OVMF's Secure Boot build with
// enforcement on: the kernel's EFI stub saw Secure Boot enabled, PCR7
// names our db certificate as the authority that verified the UKI (see
// TestSecureBootVarsEnrolled), every broker's successful attestation
// names every PCR it checked, and sbverify accepts the UKI with the db
// certificate alone.
func TestDiskImageBoots(t *testing.T) {
	requireE2E(t)
	fx := provisionedEmbassy(t)
	secure := false
	for _, l := range fx.firstBoot.consoles[twinNames[0]] {
		secure = secure || strings.Contains(l.Text, "EFI stub: UEFI Secure Boot is enabled")
	}
	if !secure {
		t.Error("the kernel's EFI stub did not see Secure Boot on")
	}
	verdict, err := bootreport.Verify(fx.evidence, loadImage(t, imageDir()).Measurements)
	if err != nil || !verdict.Check.OK() {
		t.Fatalf("first boot does not match the manifest: %v %+v", err, verdict)
	}
	hb, _ := copyEmbassy(t)
	defer hb.close()
	id := fx.ids[twinNames[0]]
	for _, b := range hb.b {
		entries, _, err := b.Audit()
		if err != nil {
			t.Fatal(err)
		}
		var checked string
		for _, e := range entries {
			if e.Appliance == id && e.Event == "attest" && e.Result == "ok" {
				checked = e.Detail["checked_pcrs"]
			}
		}
		for _, want := range []string{"firmware reference 0,1,2,3,5,6,7", "image manifest 4,7,9,11", "empty 8,12,13"} {
			if !strings.Contains(checked, want) {
				t.Errorf("%s: attest ok entry names %q, lacks %q", b.Name(), checked, want)
			}
		}
	}
	if _, err := exec.LookPath("sbverify"); err != nil {
		t.Fatal("sbverify not installed (Debian sbsigntool; make deps)")
	}
	keys := devSecureBootKeys(t)
	db := filepath.Join(t.TempDir(), "db.pem")
	os.WriteFile(db, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: keys.DB.Cert.Raw}), 0o600)
	if out, err := exec.Command("sbverify", "--cert", db, filepath.Join(imageDir(), build.UKIFile)).CombinedOutput(); err != nil {
		t.Fatalf("sbverify refuses the UKI: %v\n%s", err, out)
	}
}

// TestSecureBootRefusesForeignUKI: the image's UKI signed with another
// db key, and the same UKI with no signature at all, each on the image's
// disk layout and booted under the image's firmware variables: the
// firmware refuses to start it (Access Denied / Security Violation) and
// the console never shows the kernel.
func TestSecureBootRefusesForeignUKI(t *testing.T) {
	parallelScenario(t, 1, 20*time.Second)
	signed, err := os.ReadFile(filepath.Join(imageDir(), build.UKIFile))
	if err != nil {
		t.Fatal(err)
	}
	unsigned, err := sbkeys.StripSignatures(signed)
	if err != nil {
		t.Fatal(err)
	}
	foreignKeys, err := sbkeys.EnsureDev(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := foreignKeys.SignPE(unsigned)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		uki  []byte
	}{{"foreign-key", foreign}, {"unsigned", unsigned}} {
		t.Run(c.name, func(t *testing.T) {
			disk := filepath.Join(t.TempDir(), build.DiskFile)
			if err := diskimage.Write(disk, c.uki); err != nil {
				t.Fatal(err)
			}
			cfg := bootConfig(t, "uki-"+c.name, imageDir())
			cfg.BootDisk, cfg.NICs = disk, 1
			v := startVM(t, cfg)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			_, l, err := v.WaitFor(ctx, 0, func(s string) bool {
				return strings.Contains(s, "No bootable option") || strings.Contains(s, "Linux version") || strings.Contains(s, "EFI stub")
			})
			if err != nil {
				t.Fatalf("no verdict from the firmware: %v", err)
			}
			refused := false
			for _, l := range v.Lines() {
				if strings.Contains(l.Text, "BOOTX64.EFI") || strings.Contains(l.Text, "Misc Device") {
					refused = refused || strings.Contains(l.Text, "Access Denied") || strings.Contains(l.Text, "Security Violation")
				}
				if strings.Contains(l.Text, "Linux version") || strings.Contains(l.Text, "EFI stub") {
					t.Fatalf("the kernel ran: %s", l.Text)
				}
			}
			if !refused {
				t.Fatalf("the firmware did not refuse the UKI (last line %q)", l.Text)
			}
		})
	}
}

// brokerVerdicts waits until every broker audited a refusal with reason
// for appliance id since since (or two minutes pass), and returns how many
// did, every "attest ok" or "release" entry any broker made for it since
// (what each broker did, counted at each broker), and each refusing
// broker's first refusal detail and the firmware PCRs it named.
func brokerVerdicts(t testing.TB, hb *hostBrokers, id string, since time.Time, reason string) (refusedBy int, released, details []string, firmwarePCRs []string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		refusedBy, released, details, firmwarePCRs = 0, nil, nil, nil
		for _, b := range hb.b {
			entries, _, err := b.Audit()
			if err != nil {
				t.Fatal(err)
			}
			refused := false
			for _, e := range entries {
				if e.Appliance != id || e.Time.Before(since) {
					continue
				}
				switch {
				case e.Event == "attest" && e.Result == "fail" && e.Reason == reason:
					if !refused {
						details = append(details, b.Name()+": "+e.Detail["why"])
						firmwarePCRs = append(firmwarePCRs, e.Detail["firmware_pcrs"])
					}
					refused = true
				case e.Event == "release" || (e.Event == "attest" && e.Result == "ok"):
					released = append(released, b.Name()+": "+e.Event+" "+e.Result)
				}
			}
			if refused {
				refusedBy++
			}
		}
		if refusedBy == len(hb.b) || len(released) > 0 || time.Now().After(deadline) {
			return refusedBy, released, details, firmwarePCRs
		}
		time.Sleep(time.Second)
	}
}

// requireNoKeys checks, from the brokers' side and the client's, that the
// boot of v got nothing: every broker refused it for reason (for the
// firmware reason: naming at least the PCRs in wantPCRs, and the events),
// none audited an "attest ok" or a release since the boot began, the
// appliance never logged an unlock or serving, and ingest does not answer.
func requireNoKeys(t *testing.T, hb *hostBrokers, v *vm.VM, cfg vm.Config, id, reason string, wantPCRs ...string) {
	t.Helper()
	refusedBy, released, details, named := brokerVerdicts(t, hb, id, v.Started.Add(-time.Second), reason)
	for i, d := range details {
		if named[i] != "" {
			t.Logf("%s (firmware PCRs %s)", d, named[i])
		}
		have := strings.Split(named[i], ",")
		for _, want := range wantPCRs {
			if !slices.Contains(have, want) || !strings.Contains(d, "PCR"+want) {
				t.Errorf("the refusal names PCRs %q and %q, not PCR%s and its events", named[i], d, want)
			}
		}
	}
	if len(released) > 0 {
		t.Fatalf("released: %v", released)
	}
	if refusedBy != len(hb.b) {
		t.Fatalf("only %d of %d brokers audited %q", refusedBy, len(hb.b), reason)
	}
	for _, l := range v.Lines() {
		switch bootreport.JSONMsg(l.Text) {
		case logmsg.MsgAttested, "volume unlocked and mounted", logmsg.MsgServing:
			t.Fatalf("the appliance got past attestation: %s", l.Text)
		}
	}
	noIngest(t, cfg)
}

// TestSecureBootOffGetsNoKeys: a provisioned server whose firmware has
// Secure Boot turned off (its variables back to the blank store: no PK,
// setup mode) boots the approved UKI, which the firmware now runs without
// checking: every broker refuses it for the firmware reason (PCR7 differs
// from the reference recorded at enrollment), none releases anything, the
// disks stay locked and nothing is served.
func TestSecureBootOffGetsNoKeys(t *testing.T) {
	parallelScenario(t, 1, 25*time.Second)
	hb, cfg, id := provisioned(t, "secureboot-off")
	defer hb.close()
	blank, err := os.ReadFile(vm.DefaultOVMFVars)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(cfg.StateDir, "OVMF_VARS.fd"), blank, 0o600); err != nil {
		t.Fatal(err)
	}
	v := startVM(t, cfg)
	defer v.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	waitMsg(t, ctx, v, 0, logmsg.MsgIdentity)
	for _, l := range v.Lines() {
		if strings.Contains(l.Text, "EFI stub: UEFI Secure Boot is enabled") {
			t.Fatal("Secure Boot is still on")
		}
	}
	requireNoKeys(t, hb, v, cfg, id, broker.ReasonFirmware, "7")
}

// TestFirmwareChangedGetsNoKeys: the platform of a provisioned server
// changes; every broker refuses it for the firmware reason naming the PCR
// that changed, releases nothing, and nothing is served:
//   - option-rom: someone in the cage adds a PCI card with an option ROM
//     (an RTL8139 NIC with iPXE's EFI driver); the firmware runs and
//     measures it (PCR2). Operators who accept the change run
//     approve-firmware at k brokers (2 of 3) with the digest they
//     reviewed; the same server, card still in, then unlocks and serves,
//     and the third broker still refuses it;
//   - key-database: a dbx entry added to the firmware's variables (PCR7);
//   - firmware-build: another build of the firmware on the same variables:
//     Debian's OVMF without SMM, whose variable store the OS could write.
//     It still enforces Secure Boot and measures PCR7 alike; only PCR0
//     (its firmware volumes) tells it apart.
func TestFirmwareChangedGetsNoKeys(t *testing.T) {
	parallelScenario(t, 1, 80*time.Second)
	t.Run("option-rom", testOptionROMAdded)
	t.Run("key-database", func(t *testing.T) {
		hb, cfg, id := provisioned(t, "firmware-dbx")
		defer hb.close()
		keys := devSecureBootKeys(t)
		blank, err := os.ReadFile(vm.DefaultOVMFVars)
		if err != nil {
			t.Fatal(err)
		}
		vars, err := keys.Variables([][32]byte{sha256.Sum256([]byte("an image someone wants revoked"))}, build.VarsTimestamp)
		if err != nil {
			t.Fatal(err)
		}
		img, err := ovmfvars.Build(blank, vars)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(cfg.StateDir, "OVMF_VARS.fd"), img, 0o600); err != nil {
			t.Fatal(err)
		}
		firmwareRefused(t, hb, cfg, id, "7")
	})
	t.Run("firmware-build", func(t *testing.T) {
		hb, cfg, id := provisioned(t, "firmware-build")
		defer hb.close()
		cfg.SecureBoot, cfg.OVMFCode = false, vm.DefaultOVMFCode
		firmwareRefused(t, hb, cfg, id, "0")
	})
}

// firmwareRefused boots cfg and requires that it gets nothing, refused for
// the firmware reason naming pcrs.
func firmwareRefused(t *testing.T, hb *hostBrokers, cfg vm.Config, id string, pcrs ...string) {
	t.Helper()
	v := startVM(t, cfg)
	defer v.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	waitMsg(t, ctx, v, 0, logmsg.MsgIdentity)
	requireNoKeys(t, hb, v, cfg, id, broker.ReasonFirmware, pcrs...)
}

func testOptionROMAdded(t *testing.T) {
	hb, cfg, id := provisioned(t, "firmware-changed")
	defer hb.close()
	cfg.ExtraDevices = []string{"rtl8139,romfile=/usr/lib/ipxe/qemu/efi-rtl8139.rom,mac=52:54:00:12:34:99"}
	v := startVM(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	waitMsg(t, ctx, v, 0, logmsg.MsgIdentity)
	requireNoKeys(t, hb, v, cfg, id, broker.ReasonFirmware, "2")
	v.Close()

	// Custodians at k brokers review the change and approve exactly the
	// measurement they reviewed (its digest); the third broker does not.
	threshold := 2
	for _, b := range hb.b[:threshold] {
		st, err := b.State()
		if err != nil {
			t.Fatal(err)
		}
		var digest string
		for _, a := range st.Appliances {
			if a.ID == id && a.PendingFirmware != nil {
				digest = a.PendingFirmware.Digest
			}
		}
		if digest == "" {
			t.Fatalf("%s shows no pending firmware to review", b.Name())
		}
		if err := b.ApproveFirmware(hb.op(b), id, digest); err != nil {
			t.Fatalf("%s: approve-firmware: %v", b.Name(), err)
		}
	}
	cfg.Name = "firmware-changed-approved"
	v = startVM(t, cfg)
	defer v.Close()
	waitMsg(t, ctx, v, 0, logmsg.MsgServing)
	var ok int
	for _, b := range hb.b {
		entries, _, err := b.Audit()
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			if e.Appliance == id && e.Event == "attest" && e.Result == "ok" && !e.Time.Before(v.Started) {
				ok++
				break
			}
		}
	}
	if ok != threshold {
		t.Fatalf("%d brokers attested the approved firmware, want exactly the %d that approved it", ok, threshold)
	}
	refused := 0
	for deadline := time.Now().Add(time.Minute); refused != 1 && time.Now().Before(deadline); time.Sleep(time.Second) {
		refused, _, _, _ = brokerVerdicts(t, hb, id, v.Started, broker.ReasonFirmware)
	}
	if refused != 1 {
		t.Fatalf("%d brokers refused the server after approval at %d; the one that did not approve must", refused, threshold)
	}
}

package qemutests

import (
	"context"
	"crypto"
	"encoding/binary"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
	"unicode/utf16"

	"github.com/google/go-attestation/attest"

	"github.com/dataembassy/embassy/images/ovmfvars"
	"github.com/dataembassy/embassy/images/sbkeys"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
	"github.com/dataembassy/embassy/qemu-tests/vm"
)

// TestSecureBootVarsEnrolled boots OVMF's Secure Boot build with a VARS
// image our own code wrote (images/ovmfvars: the local-default PK, KEK and
// db of images/sbkeys, Secure Boot on), as a server would be shipped, and
// reads from the event log (replayed against the quoted PCRs) what the
// firmware itself measured into PCR7: Secure Boot on, and exactly our PK,
// KEK and db, an empty dbx. The kernel's EFI stub agrees ("UEFI Secure
// Boot is enabled").
//
// It does not show enforcement, and cannot under -kernel: QEMU patches the
// kernel's setup header, so no Authenticode signature of it verifies, and
// OVMF then falls back to its legacy loader, which checks nothing (the
// event log has no PCR4 application event and no PCR7 authority). That is
// why issue 12 boots a signed UKI from a disk image instead.
func TestSecureBootVarsEnrolled(t *testing.T) {
	requireE2E(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	imgDir := imageDir()
	m := loadImage(t, imgDir)
	ks, err := sbkeys.EnsureDev(filepath.Join(cacheDir(), "keys", "secureboot"))
	if err != nil {
		t.Fatal(err)
	}
	blank, err := os.ReadFile(vm.DefaultOVMFVars)
	if err != nil {
		t.Fatal(err)
	}
	vars, err := ks.Variables(nil, time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	if err != nil {
		t.Fatal(err)
	}
	varsImg, err := ovmfvars.Build(blank, vars)
	if err != nil {
		t.Fatal(err)
	}
	varsPath := filepath.Join(t.TempDir(), "OVMF_VARS.secureboot.fd")
	if err := os.WriteFile(varsPath, varsImg, 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := bootreport.BootConfig("secureboot-vars", imgDir, m)
	if err != nil {
		t.Fatal(err)
	}
	cfg.SecureBoot, cfg.OVMFVars = true, varsPath
	cfg.SwtpmCA = filepath.Join(cacheDir(), "swtpm-localca")
	cfg.LogDir = testLogDir(t)
	cfg.NICs = 1
	v := startVM(t, cfg)
	ev, err := bootreport.Wait(ctx, v)
	if err != nil {
		t.Fatalf("evidence: %v", err)
	}
	v.Close()
	stub := false
	for _, l := range v.Lines() {
		stub = stub || strings.Contains(l.Text, "EFI stub: UEFI Secure Boot is enabled")
	}
	if !stub {
		t.Error("the kernel's EFI stub did not see Secure Boot on")
	}
	measured := pcr7Variables(t, ev)
	for _, want := range []struct {
		name string
		data []byte
	}{
		{"SecureBoot", []byte{1}},
		{"PK", mustList(t, ks, ks.PK.Cert.Raw)},
		{"KEK", mustList(t, ks, ks.KEK.Cert.Raw)},
		{"db", mustList(t, ks, ks.DB.Cert.Raw)},
		{"dbx", nil},
	} {
		got, ok := measured[want.name]
		if !ok {
			t.Errorf("PCR7 has no %s event", want.name)
			continue
		}
		if string(got) != string(want.data) {
			t.Errorf("PCR7 measured %s as %d bytes, not the %d we enrolled", want.name, len(got), len(want.data))
		}
	}
}

func mustList(t *testing.T, ks sbkeys.Keys, cert []byte) []byte {
	t.Helper()
	l, err := ovmfvars.SignatureList(ovmfvars.CertX509, ks.Owner(), cert)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// pcr7Variables replays the reported event log against the reported PCRs
// and returns the variables the firmware measured into PCR7
// (EV_EFI_VARIABLE_DRIVER_CONFIG: GUID, name length, data length, UTF-16
// name, data), by name.
func pcr7Variables(t *testing.T, ev *bootreport.Evidence) map[string][]byte {
	t.Helper()
	el, err := attest.ParseEventLog(ev.EventLog)
	if err != nil {
		t.Fatal(err)
	}
	var pcrs []attest.PCR
	for i, d := range ev.PCRs {
		pcrs = append(pcrs, attest.PCR{Index: i, Digest: d, DigestAlg: crypto.SHA256})
	}
	sort.Slice(pcrs, func(a, b int) bool { return pcrs[a].Index < pcrs[b].Index })
	events, err := el.Verify(pcrs)
	if err != nil {
		t.Fatalf("the event log does not replay to the PCRs: %v", err)
	}
	out := map[string][]byte{}
	for _, e := range events {
		if e.Index != 7 || e.Type.String() != "EV_EFI_VARIABLE_DRIVER_CONFIG" {
			continue
		}
		d := e.Data
		if len(d) < 32 {
			t.Fatalf("PCR7 variable event of %d bytes", len(d))
		}
		nameLen, dataLen := binary.LittleEndian.Uint64(d[16:24]), binary.LittleEndian.Uint64(d[24:32])
		if nameLen > 64 || uint64(len(d)) != 32+2*nameLen+dataLen {
			t.Fatalf("PCR7 variable event sizes %d/%d in %d bytes", nameLen, dataLen, len(d))
		}
		u := make([]uint16, nameLen)
		for i := range u {
			u[i] = binary.LittleEndian.Uint16(d[32+2*i:])
		}
		out[string(utf16.Decode(u))] = d[32+2*nameLen:]
	}
	return out
}

package qemutests

import (
	"crypto"
	"encoding/binary"
	"sort"
	"strings"
	"testing"
	"unicode/utf16"

	"github.com/google/go-attestation/attest"

	"github.com/dataembassy/embassy/images/ovmfvars"
	"github.com/dataembassy/embassy/images/sbkeys"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
)

// TestSecureBootVarsEnrolled reads, from the provisioned embassy's first
// boot (the image's disk under OVMF's Secure Boot build, with the VARS
// file mkimage wrote; no boot of its own), what the firmware itself
// measured into PCR7, replayed against the quoted PCRs: Secure Boot on,
// exactly our PK, KEK and db, an empty dbx, and our db certificate as the
// authority that verified the UKI. The kernel's EFI stub agrees ("UEFI
// Secure Boot is enabled").
func TestSecureBootVarsEnrolled(t *testing.T) {
	requireE2E(t)
	ks := devSecureBootKeys(t)
	fx := provisionedEmbassy(t)
	stub := false
	for _, l := range fx.firstBoot.consoles[twinNames[0]] {
		stub = stub || strings.Contains(l.Text, "EFI stub: UEFI Secure Boot is enabled")
	}
	if !stub {
		t.Error("the kernel's EFI stub did not see Secure Boot on")
	}
	measured, authority := pcr7Variables(t, fx.evidence)
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
	owner := ks.Owner()
	if want := append(owner[:], ks.DB.Cert.Raw...); len(authority) != 1 || string(authority[0]) != string(want) {
		t.Errorf("PCR7 authorities: %d, want exactly our db certificate", len(authority))
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
// name, data), by name, and the data of its authority events
// (EV_EFI_VARIABLE_AUTHORITY).
func pcr7Variables(t *testing.T, ev *bootreport.Evidence) (map[string][]byte, [][]byte) {
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
	var authorities [][]byte
	for _, e := range events {
		if e.Index != 7 {
			continue
		}
		authority := e.Type.String() == "EV_EFI_VARIABLE_AUTHORITY"
		if !authority && e.Type.String() != "EV_EFI_VARIABLE_DRIVER_CONFIG" {
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
		if authority {
			authorities = append(authorities, d[32+2*nameLen:])
			continue
		}
		out[string(utf16.Decode(u))] = d[32+2*nameLen:]
	}
	return out, authorities
}

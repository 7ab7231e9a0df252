package attester_test

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/pcrs"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// TestTPM2CheckquoteAcceptsOurQuote exports a quote made by the appliance
// side in tpm2-tools' formats and has tpm2_checkquote, a verifier we did
// not write, check the signature, the qualifying data and the PCR values.
func TestTPM2CheckquoteAcceptsOurQuote(t *testing.T) {
	if _, err := exec.LookPath("tpm2_checkquote"); err != nil {
		t.Skip("tpm2_checkquote not installed (make deps installs tpm2-tools)")
	}
	sim := tpmtest.NewSimulator(t, nil, 7)
	tpmtest.MeasuredBoot(t, sim, tpmtest.NewBootDigests("interop"))
	a, err := attester.Open(sim, attester.EKECC)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	extra := sha256.Sum256([]byte("nonce and TLS key"))
	q, err := a.Quote(extra[:])
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	der, err := x509.MarshalPKIXPublicKey(a.AKPublicKey())
	if err != nil {
		t.Fatal(err)
	}
	var values [][]byte
	for _, i := range pcrs.Indexes() {
		values = append(values, q.GetPcrs().GetPcrs()[uint32(i)])
	}
	pcrBlob := tpm2ToolsPCRs(values)
	files := map[string][]byte{
		"ak.pem":    pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}),
		"quote.msg": q.GetQuote(),
		"quote.sig": q.GetRawSig(),
		"pcrs.bin":  pcrBlob,
	}
	for n, b := range files {
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	check := func(qual string, pcrFile string) ([]byte, error) {
		return exec.Command("tpm2_checkquote", "-u", filepath.Join(dir, "ak.pem"), "-m", filepath.Join(dir, "quote.msg"),
			"-s", filepath.Join(dir, "quote.sig"), "-f", pcrFile, "-g", "sha256", "-q", qual).CombinedOutput()
	}
	if out, err := check(hex.EncodeToString(extra[:]), filepath.Join(dir, "pcrs.bin")); err != nil {
		t.Fatalf("tpm2_checkquote rejects our quote: %v\n%s", err, out)
	}
	// And it rejects a wrong nonce and changed PCR values, so the check
	// above was not vacuous.
	wrong := sha256.Sum256([]byte("another nonce"))
	if _, err := check(hex.EncodeToString(wrong[:]), filepath.Join(dir, "pcrs.bin")); err == nil {
		t.Fatal("tpm2_checkquote accepted a wrong qualifying data")
	}
	values[4] = append([]byte(nil), values[4]...)
	values[4][0] ^= 1
	os.WriteFile(filepath.Join(dir, "pcrs-changed.bin"), tpm2ToolsPCRs(values), 0o600)
	if _, err := check(hex.EncodeToString(extra[:]), filepath.Join(dir, "pcrs-changed.bin")); err == nil {
		t.Fatal("tpm2_checkquote accepted changed PCR values")
	}
}

// tpm2ToolsPCRs writes the SHA-256 values of the PCRs of pcrs.Indexes (in
// that order) the way tpm2_quote -o does
// ("serialized"): the in-memory TPML_PCR_SELECTION (132 bytes), a UINT32
// count, then that many TPML_DIGEST structs (up to 8 digests each, 532
// bytes), little-endian with C padding.
func tpm2ToolsPCRs(values [][]byte) []byte {
	le32 := func(v uint32) []byte { return []byte{byte(v), byte(v >> 8), byte(v >> 16), byte(v >> 24)} }
	out := le32(1)
	var sel [4]byte
	for _, i := range pcrs.Indexes() {
		sel[i/8] |= 1 << (i % 8)
	}
	out = append(out, 0x0b, 0x00, 3) // hash, sizeofSelect
	out = append(out, sel[:]...)     // pcrSelect[4]
	out = append(out, 0x00)          // pad
	out = append(out, make([]byte, 8*15)...)
	var groups [][][]byte
	for i := 0; i < len(values); i += 8 {
		groups = append(groups, values[i:min(i+8, len(values))])
	}
	out = append(out, le32(uint32(len(groups)))...)
	for _, g := range groups {
		out = append(out, le32(uint32(len(g)))...)
		for _, v := range g {
			out = append(out, byte(len(v)), byte(len(v)>>8))
			out = append(out, v...)
			out = append(out, make([]byte, 64-len(v))...)
		}
		out = append(out, make([]byte, 66*(8-len(g)))...)
	}
	return out
}

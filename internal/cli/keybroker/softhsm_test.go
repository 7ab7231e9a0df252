//go:build cgo

package keybroker

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dataembassy/embassy/broker/hsm/hsmtest"
	"github.com/dataembassy/embassy/broker/seal"
)

// TestInitServeWithSoftHSM2: init --pkcs11-* generates the master key in
// the token and writes no master key file; serve's loading with the same
// flags seals and opens with it, and refuses missing or other flags.
func TestInitServeWithSoftHSM2(t *testing.T) {
	cfg := hsmtest.Token(t, "broker-a", "")
	tmp := t.TempDir()
	cert, key := brokerCA(t, tmp)
	pin := filepath.Join(tmp, "pin")
	if err := os.WriteFile(pin, append(cfg.PIN, '\n'), 0o600); err != nil {
		t.Fatal(err)
	}
	p := pkcs11Options{module: cfg.Module, tokenLabel: cfg.TokenLabel, pinFile: pin, keyLabel: "broker-a-master"}
	dir := filepath.Join(tmp, "broker")
	var out bytes.Buffer
	if err := initBroker(&out, initOptions{dir: dir, name: "broker-a", caCert: cert, caKey: key, hosts: "127.0.0.1", p11: p}); err != nil {
		t.Fatal(err)
	}
	t.Log(strings.TrimSpace(out.String()))
	if _, err := os.Stat(filepath.Join(dir, MasterKeyFile)); err == nil {
		t.Fatal("init wrote a master key file")
	}
	if err := initBroker(&out, initOptions{dir: dir, name: "broker-a", caCert: cert, caKey: key, p11: p}); err == nil ||
		!strings.Contains(err.Error(), "already initialised") {
		t.Fatalf("second init: %v", err)
	}

	mk, _, _, err := loadState(dir, p)
	if err != nil {
		t.Fatal(err)
	}
	sealed, err := mk.sealer.Seal([]byte("share"), []byte("aad"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(sealed, seal.Header(seal.PKCS11)) {
		t.Fatalf("not sealed by the token: %x", sealed)
	}
	if got, err := mk.sealer.Open(sealed, []byte("aad")); err != nil || string(got) != "share" {
		t.Fatalf("open: %q, %v", got, err)
	}
	mk.close()

	for _, tc := range []struct {
		name string
		p    pkcs11Options
		want string
	}{
		{"no flags", pkcs11Options{}, "keeps its master key in PKCS#11 token \"broker-a\""},
		{"another key label", pkcs11Options{module: p.module, tokenLabel: p.tokenLabel, pinFile: p.pinFile, keyLabel: "other"}, "not key \"other\""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, _, err := loadState(dir, tc.p)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
		})
	}
}

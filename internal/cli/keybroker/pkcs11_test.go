package keybroker

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dataembassy/embassy/broker/hsm"
	"github.com/dataembassy/embassy/broker/pki"
)

func TestPKCS11FlagsChecked(t *testing.T) {
	dir := t.TempDir()
	module := filepath.Join(dir, "module.so")
	os.WriteFile(module, nil, 0o644)
	pin := filepath.Join(dir, "pin")
	os.WriteFile(pin, []byte("1234\n"), 0o600)
	open := filepath.Join(dir, "pin-readable")
	os.WriteFile(open, []byte("1234\n"), 0o644)
	empty := filepath.Join(dir, "pin-empty")
	os.WriteFile(empty, []byte("\n"), 0o600)

	full := pkcs11Options{module: module, tokenLabel: "t", pinFile: pin, keyLabel: "k"}
	with := func(f func(*pkcs11Options)) pkcs11Options { p := full; f(&p); return p }
	tests := []struct {
		name string
		p    pkcs11Options
		want string // "" : accepted
	}{
		{"none: the file key", pkcs11Options{}, ""},
		{"all four", full, ""},
		{"token label without module", pkcs11Options{tokenLabel: "t"}, "--pkcs11-token-label given without --pkcs11-module"},
		{"pin file and key without module", pkcs11Options{pinFile: pin, keyLabel: "k"}, "--pkcs11-key-label, --pkcs11-pin-file given without --pkcs11-module"},
		{"module alone", pkcs11Options{module: module}, "--pkcs11-module needs --pkcs11-token-label, --pkcs11-pin-file, --pkcs11-key-label"},
		{"no key label", with(func(p *pkcs11Options) { p.keyLabel = "" }), "--pkcs11-module needs --pkcs11-key-label"},
		{"module missing", with(func(p *pkcs11Options) { p.module = filepath.Join(dir, "none.so") }), "PKCS#11 module"},
		{"PIN file missing", with(func(p *pkcs11Options) { p.pinFile = filepath.Join(dir, "none") }), "PKCS#11 PIN file"},
		{"PIN file readable by others", with(func(p *pkcs11Options) { p.pinFile = open }), "readable by others"},
		{"empty PIN", with(func(p *pkcs11Options) { p.pinFile = empty }), "PIN missing"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var err error
			if tc.p.enabled() {
				var c hsm.Config
				c, err = tc.p.config()
				if err == nil && string(c.PIN) != "1234" {
					t.Fatalf("PIN %q", c.PIN)
				}
			} else {
				err = tc.p.check()
			}
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// brokerCA writes a broker CA to dir for init.
func brokerCA(t *testing.T, dir string) (cert, key string) {
	t.Helper()
	ca, err := pki.NewRootCA("home-state broker CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, key = filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca.key")
	if err := pki.WritePEM(cert, ca.Cert, key, ca.Key); err != nil {
		t.Fatal(err)
	}
	return cert, key
}

// TestFileMasterKeyRefusesPKCS11Flags: a folder initialised with a master
// key file is not served with --pkcs11-* flags (and the reverse is in
// TestInitServeWithSoftHSM2).
func TestFileMasterKeyRefusesPKCS11Flags(t *testing.T) {
	tmp := t.TempDir()
	cert, key := brokerCA(t, tmp)
	dir := filepath.Join(tmp, "broker")
	var out bytes.Buffer
	if err := initBroker(&out, initOptions{dir: dir, name: "broker-a", caCert: cert, caKey: key, hosts: "127.0.0.1"}); err != nil {
		t.Fatal(err)
	}
	mk, _, _, err := loadState(dir, pkcs11Options{})
	if err != nil || mk.token != nil {
		t.Fatalf("file key: %+v, %v", mk, err)
	}
	mk.close()
	module := filepath.Join(tmp, "module.so")
	os.WriteFile(module, nil, 0o644)
	pin := filepath.Join(tmp, "pin")
	os.WriteFile(pin, []byte("1234\n"), 0o600)
	_, _, _, err = loadState(dir, pkcs11Options{module: module, tokenLabel: "t", pinFile: pin, keyLabel: "k"})
	if err == nil || !strings.Contains(err.Error(), "keeps its master key in a file") {
		t.Fatalf("got %v", err)
	}
}

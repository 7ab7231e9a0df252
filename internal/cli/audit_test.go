package cli_test

import (
	"crypto/ed25519"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/images/devpki"
	"github.com/dataembassy/embassy/internal/cli/embassyctl"
	"github.com/dataembassy/embassy/internal/cli/keybroker"
	"github.com/dataembassy/embassy/operator/opclient"
)

// TestAuditVerifyRefusesMalformedHeadsFile: a heads file that is not what
// audit verify writes is refused with what is wrong, before any broker is
// asked, and left as it was.
func TestAuditVerifyRefusesMalformedHeadsFile(t *testing.T) {
	tmp := t.TempDir()
	brokers := filepath.Join(tmp, "brokers.json")
	os.WriteFile(brokers, []byte(`[{"name":"a","url":"https://127.0.0.1:1"}]`), 0o644)
	for _, tc := range []struct {
		name, data, want string
	}{
		{"not JSON", "[1,2", "malformed audit heads file"},
		{"another schema", `{"version":1,"heads":[]}`, `unknown field "heads"`},
		{"another version", `{"version":7,"brokers":{}}`, "version 7, want 1"},
		{"bad head", `{"version":1,"brokers":{"a":[{"broker":"a","seq":3,"hash":"00","time":"2030-01-01T00:00:00Z","signature":""}]}}`, "is not 64 lowercase hex digits"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, heads := range []string{filepath.Join(t.TempDir(), "h.json"), filepath.Join(tmp, embassyctl.HeadsFile)} {
				os.WriteFile(heads, []byte(tc.data), 0o600)
				args := []string{"--brokers", brokers, "audit", "verify"}
				if filepath.Base(heads) != embassyctl.HeadsFile {
					args = append(args, "--heads", heads)
				}
				_, err := execute(embassyctl.NewRootCmd(), args...)
				if !errors.Is(err, opclient.ErrHeadsFile) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), heads) {
					t.Fatalf("error %v, want %q about %s", err, tc.want, heads)
				}
				if got, _ := os.ReadFile(heads); string(got) != tc.data {
					t.Fatalf("heads file rewritten: %s", got)
				}
			}
		})
	}
}

// TestAuditKeyPinning: keybroker init writes the audit signing key and
// prints its public half; embassyctl pins it with brokers add --audit-key
// or brokers pin-audit-key, and refuses to replace it with another.
func TestAuditKeyPinning(t *testing.T) {
	tmp := t.TempDir()
	ca, err := devpki.Ensure(filepath.Join(tmp, "pki"), "broker-ca", "test broker CA")
	if err != nil {
		t.Fatal(err)
	}
	var pubs []string
	for _, name := range []string{"a", "b"} {
		dir := filepath.Join(tmp, name)
		out, err := execute(keybroker.NewRootCmd(), "init", "--dir", dir, "--name", name,
			"--broker-ca-cert", ca.CertPath, "--broker-ca-key", ca.KeyPath)
		pub := filepath.Join(dir, audit.SigningPubKeyFile)
		if err != nil || !strings.Contains(out, "--audit-key "+pub) || !strings.Contains(out, "BEGIN PUBLIC KEY") {
			t.Fatalf("init: %v\n%s", err, out)
		}
		if _, err := audit.LoadSigningKey(filepath.Join(dir, audit.SigningKeyFile)); err != nil {
			t.Fatal(err)
		}
		again, err := execute(keybroker.NewRootCmd(), "audit-key", "--dir", dir)
		if err != nil || !strings.Contains(out, again[strings.Index(again, "-----BEGIN"):]) {
			t.Fatalf("audit-key prints another key: %v\n%s", err, again)
		}
		pubs = append(pubs, pub)
	}
	// A folder made before audit keys gets one from audit-key.
	old := filepath.Join(tmp, "a")
	os.Remove(filepath.Join(old, audit.SigningKeyFile))
	if out, err := execute(keybroker.NewRootCmd(), "audit-key", "--dir", old); err != nil || !strings.Contains(out, "BEGIN PUBLIC KEY") {
		t.Fatalf("audit-key on an older folder: %v\n%s", err, out)
	}

	list := filepath.Join(tmp, "brokers.json")
	ctl := func(args ...string) error {
		_, err := execute(embassyctl.NewRootCmd(), append([]string{"--brokers", list}, args...)...)
		return err
	}
	if err := ctl("brokers", "add", "a", "https://127.0.0.1:8441", "--audit-key", pubs[0]); err != nil {
		t.Fatal(err)
	}
	if err := ctl("brokers", "add", "b", "https://127.0.0.1:8442", "--audit-key", ca.CertPath); err == nil {
		t.Fatal("a certificate was pinned as an audit key")
	}
	if err := ctl("brokers", "add", "b", "https://127.0.0.1:8442"); err != nil {
		t.Fatal(err)
	}
	if err := ctl("brokers", "pin-audit-key", "b", pubs[1]); err != nil {
		t.Fatal(err)
	}
	if err := ctl("brokers", "pin-audit-key", "b", pubs[0]); err == nil {
		t.Fatal("another key replaced broker b's pinned audit key")
	}
	if err := ctl("brokers", "pin-audit-key", "c", pubs[0]); err == nil {
		t.Fatal("a key was pinned for a broker not in the list")
	}
	got, err := opclient.LoadBrokers(list)
	if err != nil {
		t.Fatal(err)
	}
	for i, br := range got {
		data, _ := os.ReadFile(pubs[i])
		want, _ := audit.ParsePublicKey(data)
		if !ed25519.PublicKey(br.AuditKey).Equal(want) {
			t.Errorf("broker %s pins %x", br.Name, br.AuditKey)
		}
	}
	out, _ := execute(embassyctl.NewRootCmd(), "--brokers", list, "brokers", "list")
	if strings.Count(out, "audit key sha256:") != 2 {
		t.Errorf("brokers list does not show the pinned keys:\n%s", out)
	}
}

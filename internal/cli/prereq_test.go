package cli_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/dataembassy/embassy/images/devpki"
	"github.com/dataembassy/embassy/images/manifest"
	"github.com/dataembassy/embassy/internal/cli"
	"github.com/dataembassy/embassy/internal/cli/embassyctl"
	"github.com/dataembassy/embassy/internal/cli/keybroker"
	"github.com/dataembassy/embassy/internal/cli/mkimage"
)

// TestMissingPrerequisitesSayWhatToRun checks that each missing input
// names the command or flag that provides it.
func TestMissingPrerequisitesSayWhatToRun(t *testing.T) {
	tmp := t.TempDir()
	pki := filepath.Join(tmp, "pki")
	brokerCA, err := devpki.Ensure(pki, "broker-ca", "test broker CA")
	if err != nil {
		t.Fatal(err)
	}
	opCA, err := devpki.Ensure(pki, "operator-ca", "test operator CA")
	if err != nil {
		t.Fatal(err)
	}
	opCert, opKey, err := devpki.EnsureLeaf(pki, "operator", "test operator", opCA)
	if err != nil {
		t.Fatal(err)
	}
	brokers := filepath.Join(tmp, "brokers.json")
	if err := os.WriteFile(brokers, []byte(`[{"name":"a","url":"https://127.0.0.1:1"}]`), 0o644); err != nil {
		t.Fatal(err)
	}
	initialised := filepath.Join(tmp, "broker-a")
	os.MkdirAll(initialised, 0o700)
	os.WriteFile(filepath.Join(initialised, keybroker.MasterKeyFile), []byte("00\n"), 0o600)
	image := filepath.Join(tmp, "image")
	os.MkdirAll(image, 0o755)
	os.WriteFile(filepath.Join(image, manifest.File), []byte("{}"), 0o644)
	missing := filepath.Join(tmp, "missing")
	ctl := []string{"--brokers", brokers, "--cert", opCert, "--key", opKey, "--ca", brokerCA.CertPath}

	for _, tc := range []struct {
		name string
		root func() *cobra.Command
		args []string
		next string // what the error says to do
	}{
		{"embassyctl without a broker list", embassyctl.NewRootCmd,
			[]string{"--brokers", missing, "status"}, "embassyctl brokers add"},
		{"embassyctl brokers list without a list", embassyctl.NewRootCmd,
			[]string{"--brokers", missing, "brokers", "list"}, "embassyctl brokers add"},
		{"embassyctl without an operator certificate", embassyctl.NewRootCmd,
			[]string{"--brokers", brokers, "--cert", missing, "--key", missing, "enroll", "x"}, "--cert and --key"},
		{"embassyctl without a broker CA", embassyctl.NewRootCmd,
			append(ctl, "--ca", missing, "status"), "--ca"},
		{"embassyctl approve-image without an image", embassyctl.NewRootCmd,
			append(ctl, "approve-image", missing), "mkimage build --out " + missing},
		{"keybroker serve without state", keybroker.NewRootCmd,
			[]string{"serve", "--dir", missing, "--name", "a", "--operator-ca", opCA.CertPath,
				"--manufacturer-ca", opCA.CertPath, "--image-pubkey", missing}, "keybroker init --dir " + missing},
		{"keybroker init twice", keybroker.NewRootCmd,
			[]string{"init", "--dir", initialised, "--name", "a", "--broker-ca-cert", brokerCA.CertPath,
				"--broker-ca-key", brokerCA.KeyPath}, "keybroker serve --dir " + initialised},
		{"keybroker init without the broker CA", keybroker.NewRootCmd,
			[]string{"init", "--dir", missing, "--name", "a", "--broker-ca-cert", missing,
				"--broker-ca-key", missing}, "--broker-ca-cert"},
		{"mkimage verify without an image", mkimage.NewRootCmd,
			[]string{"verify", missing}, "mkimage build --out " + missing},
		{"mkimage verify without the public key", mkimage.NewRootCmd,
			[]string{"verify", "--pubkey", missing, image}, "--pubkey"},
		{"mkimage build without its config", mkimage.NewRootCmd,
			[]string{"build", "--config", missing, "--cache", tmp, "--out", missing}, "--config"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := execute(tc.root(), tc.args...)
			var ns *cli.NextStep
			if !errors.As(err, &ns) {
				t.Fatalf("error %v does not say what to do next", err)
			}
			if !strings.Contains(ns.Next, tc.next) {
				t.Errorf("next step %q does not name %q", ns.Next, tc.next)
			}
		})
	}
	if _, err := os.Stat(missing); err == nil {
		t.Errorf("a failed command created %s", missing)
	}
}

func TestBrokersAddWritesTheList(t *testing.T) {
	list := filepath.Join(t.TempDir(), "sub", "operator.json")
	for _, b := range [][]string{{"broker-a", "https://127.0.0.1:8441"}, {"broker-b", "https://127.0.0.1:8442"}} {
		if _, err := execute(embassyctl.NewRootCmd(), append([]string{"-brokers", list, "brokers", "add"}, b...)...); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := execute(embassyctl.NewRootCmd(), "--brokers", list, "brokers", "add", "broker-a", "https://x:1"); err == nil {
		t.Error("a second broker-a was added")
	}
	out, err := execute(embassyctl.NewRootCmd(), "--brokers", list, "brokers", "list")
	if err != nil {
		t.Fatal(err)
	}
	if want := "broker-a     https://127.0.0.1:8441\nbroker-b     https://127.0.0.1:8442\n"; out != want {
		t.Errorf("brokers list = %q, want %q", out, want)
	}
}

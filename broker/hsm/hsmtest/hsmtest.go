// Package hsmtest makes throwaway SoftHSM2 tokens for tests: each in its own
// temporary token folder, selected with SOFTHSM2_CONF for the test's
// duration. Tests skip when SoftHSM2 is not installed, except under
// EMBASSY_E2E=1 (make test installs it), where they fail.
package hsmtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/dataembassy/embassy/broker/hsm"
)

// Module is where Debian's softhsm2 package installs the PKCS#11 module.
const Module = "/usr/lib/softhsm/libsofthsm2.so"

// Token initialises a fresh SoftHSM2 token labelled label in a temporary
// folder and returns the configuration of key keyLabel in it (not yet
// generated). It sets SOFTHSM2_CONF for the rest of the test, so tests
// using it cannot run in parallel.
func Token(t testing.TB, label, keyLabel string) hsm.Config {
	t.Helper()
	util, err := exec.LookPath("softhsm2-util")
	if _, merr := os.Stat(Module); err == nil && merr != nil {
		err = merr
	}
	if err != nil {
		if os.Getenv("EMBASSY_E2E") == "1" {
			t.Fatalf("SoftHSM2 is required under EMBASSY_E2E=1 (apt-get install softhsm2): %v", err)
		}
		t.Skipf("broker/hsm: softhsm2 not installed (%v); `apt-get install softhsm2` to run", err)
	}
	// Not t.TempDir: its name comes from the test's, and SoftHSM2's
	// configuration parser cuts a value at '=' (a sub-benchmark such as
	// key=softhsm2 would name a token folder that does not exist).
	dir, err := os.MkdirTemp("", "softhsm2-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	tokens := filepath.Join(dir, "tokens")
	if err := os.Mkdir(tokens, 0o700); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	body := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", tokens)
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SOFTHSM2_CONF", conf)
	pin := "1234-test-pin"
	out, err := exec.Command(util, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", "5678-test-so-pin").CombinedOutput()
	if err != nil {
		t.Fatalf("softhsm2-util --init-token: %v: %s", err, out)
	}
	return hsm.Config{Module: Module, TokenLabel: label, PIN: []byte(pin), KeyLabel: keyLabel}
}

package vm

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
)

// SetupTPM initialises a swtpm state folder once: a TPM 2.0 with a SHA-256
// PCR bank, an EK and an EK certificate signed by the local CA in caDir
// (created by swtpm_localca on first use). An initialised state is kept.
func SetupTPM(ctx context.Context, stateDir, caDir string) error {
	if _, err := os.Stat(filepath.Join(stateDir, "tpm2-00.permall")); err == nil {
		return nil
	}
	if err := os.MkdirAll(caDir, 0o700); err != nil {
		return fmt.Errorf("create swtpm CA folder: %w", err)
	}
	caDir, err := filepath.Abs(caDir)
	if err != nil {
		return err
	}
	// One swtpm_localca at a time may touch the CA's serial counter.
	lock, err := os.OpenFile(filepath.Join(caDir, ".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("lock swtpm CA: %w", err)
	}
	files := map[string]string{
		"swtpm-localca.conf":    fmt.Sprintf("statedir = %[1]s\nsigningkey = %[1]s/signkey.pem\nissuercert = %[1]s/issuercert.pem\ncertserial = %[1]s/certserial\n", caDir),
		"swtpm-localca.options": "--platform-manufacturer Embassy\n--platform-version 2.1\n--platform-model QEMU\n",
		"swtpm_setup.conf":      fmt.Sprintf("create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = %[1]s/swtpm-localca.conf\ncreate_certs_tool_options = %[1]s/swtpm-localca.options\nactive_pcr_banks = sha256\n", caDir),
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(caDir, name), []byte(content), 0o600); err != nil {
			return err
		}
	}
	cmd := exec.CommandContext(ctx, "swtpm_setup", "--tpm2",
		"--tpmstate", stateDir,
		"--config", filepath.Join(caDir, "swtpm_setup.conf"),
		"--create-ek-cert", "--create-platform-cert", "--lock-nvram",
		"--pcr-banks", "sha256", "--overwrite")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("swtpm_setup: %w: %s", err, strings.TrimSpace(out.String()))
	}
	return nil
}

// CACertPath returns the local CA certificate that signs EK certificates,
// for use as the verifier's manufacturer-CA bundle.
func CACertPath(caDir string) string { return filepath.Join(caDir, "issuercert.pem") }

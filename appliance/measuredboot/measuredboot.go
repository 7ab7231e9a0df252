// Package measuredboot collects the appliance's measured-boot evidence: the
// firmware's TCG2 event log and the TPM's values of the quoted PCRs
// (package tpm/pcrs). The home state's verifier replays the one against
// the other.
package measuredboot

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/google/go-tpm-tools/client"
	"github.com/google/go-tpm/tpmutil"

	"github.com/dataembassy/embassy/tpm/pcrs"
)

// Paths of the kernel's TPM interfaces.
const (
	EventLogPath = "/sys/kernel/security/tpm0/binary_bios_measurements"
	TPMPath      = "/dev/tpmrm0"
)

// Evidence is an unverified measured-boot report.
type Evidence struct {
	EventLog []byte
	PCRs     map[int][]byte // SHA-256 bank
}

// OpenTPM opens the kernel's TPM resource manager, waiting up to timeout for
// the device node to appear.
func OpenTPM(timeout time.Duration) (io.ReadWriteCloser, error) {
	deadline := time.Now().Add(timeout)
	for {
		rw, err := tpmutil.OpenTPM(TPMPath)
		if err == nil {
			return rw, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("open TPM %s: %w", TPMPath, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ReadPCRs reads the values of the quoted PCRs (package tpm/pcrs).
func ReadPCRs(rw io.ReadWriter) (map[int][]byte, error) {
	values, err := client.ReadPCRs(rw, pcrs.Selection())
	if err != nil {
		return nil, fmt.Errorf("read PCRs: %w", err)
	}
	out := map[int][]byte{}
	for i, v := range values.GetPcrs() {
		out[int(i)] = v
	}
	if err := pcrs.Check(out); err != nil {
		return nil, fmt.Errorf("TPM returned %d of %d PCRs: %w", len(out), pcrs.Count, err)
	}
	return out, nil
}

// Collect reads the event log and the PCRs.
func Collect(rw io.ReadWriter) (*Evidence, error) {
	log, err := os.ReadFile(EventLogPath)
	if err != nil {
		return nil, fmt.Errorf("read event log: %w", err)
	}
	values, err := ReadPCRs(rw)
	if err != nil {
		return nil, err
	}
	return &Evidence{EventLog: log, PCRs: values}, nil
}

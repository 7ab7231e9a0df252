// Package measure predicts the measured-boot events of an image that UEFI
// firmware boots from disk under Secure Boot: the signed UKI's Authenticode
// digest in PCR4, the Secure Boot state and authority in PCR7, and the two
// PCR9 events the kernel's EFI stub logs for the command line and the
// initrd (systemd-stub's PCR11 events are predicted by package uki).
package measure

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"unicode/utf16"

	"github.com/dataembassy/embassy/images/authenticode"
)

// Event descriptions the Linux EFI stub puts in its PCR9 tagged events.
const (
	LoadOptionsEvent = "LOADED_IMAGE::LoadOptions"
	InitrdEvent      = "Linux initrd"
)

// Authenticode returns the PCR4 digest of a PE image the firmware starts:
// its Authenticode SHA-256, which a signature does not change.
func Authenticode(img []byte) ([32]byte, error) {
	d, err := authenticode.SHA256(img)
	if err != nil {
		return d, fmt.Errorf("Authenticode digest: %w", err)
	}
	return d, nil
}

// LoadOptions returns the bytes the kernel's EFI stub measures for a
// command line: the UEFI LoadOptions systemd-stub hands the kernel from
// the UKI's .cmdline section, a NUL-terminated UTF-16LE string.
func LoadOptions(cmdline string) []byte {
	units := utf16.Encode([]rune(cmdline))
	out := make([]byte, 0, 2*len(units)+2)
	for _, u := range units {
		out = binary.LittleEndian.AppendUint16(out, u)
	}
	return append(out, 0, 0)
}

// Cmdline returns the PCR9 LoadOptions event digest for a command line.
func Cmdline(cmdline string) [32]byte {
	return sha256.Sum256(LoadOptions(cmdline))
}

// Initrd returns the PCR9 initrd event digest: the hash of the initrd
// exactly as systemd-stub hands it to the kernel.
func Initrd(initrd []byte) [32]byte {
	return sha256.Sum256(initrd)
}

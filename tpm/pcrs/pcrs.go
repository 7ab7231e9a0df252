// Package pcrs defines, once, the PCR selection every attestation covers:
// PCRs 0-9 and 11-13 of the SHA-256 bank. The appliance quotes and reads
// it (tpm/attester, appliance/measuredboot); the brokers and the operator
// verify quotes over exactly it and seal shares to it (tpm/verifier).
//
// PCRs 0-3 and 5-7 are the platform's own (Platform): firmware code and
// configuration, option ROMs and their configuration, the GPT and boot
// manager data, and the Secure Boot policy. PCR4 and 8-9 hold the image
// the firmware loaded, PCR11 the sections of the unified kernel image as
// systemd-stub measures them, PCR12 the stub's command-line and
// credential overrides and PCR13 the system extensions it found beside the
// UKI (an approved boot has neither). PCR10 (IMA) is left out: it changes
// at run time.
package pcrs

import (
	"fmt"
	"slices"

	pb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm/legacy/tpm2"
)

// indexes is the quoted selection, ascending.
var indexes = []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13}

// platform is the subset that the firmware and the platform's own
// configuration measure: its values cannot be predicted from the image.
var platform = []int{0, 1, 2, 3, 5, 6, 7}

// Count is the number of quoted PCRs (the length of Indexes).
const Count = 13

// Hash is the quoted bank, as the TPM names it.
const Hash = tpm2.AlgSHA256

// ProtoHash is the quoted bank, as go-tpm-tools' messages name it.
const ProtoHash = pb.HashAlgo_SHA256

// Description names the selection in messages.
const Description = "SHA-256 PCRs 0-9 and 11-13"

// Indexes lists the quoted PCRs in ascending order (a fresh slice).
func Indexes() []int { return slices.Clone(indexes) }

// Platform lists the platform PCRs in ascending order (a fresh slice):
// 0 (firmware code), 1 (firmware configuration, boot variables), 2 (option
// ROMs), 3 (their configuration), 5 (GPT, boot manager data), 6 (platform
// specific) and 7 (Secure Boot policy and authorities).
func Platform() []int { return slices.Clone(platform) }

// IsPlatform reports whether PCR i is a platform PCR.
func IsPlatform(i int) bool { return slices.Contains(platform, i) }

// Selection is the quoted PCRs as a TPM selection.
func Selection() tpm2.PCRSelection {
	return tpm2.PCRSelection{Hash: Hash, PCRs: Indexes()}
}

// Check reports whether values holds exactly the quoted PCRs, each a
// SHA-256 value: no index missing, none more.
func Check(values map[int][]byte) error {
	for _, i := range indexes {
		v, ok := values[i]
		if !ok {
			return fmt.Errorf("PCR %d missing: want the values of %s", i, Description)
		}
		if len(v) != 32 {
			return fmt.Errorf("PCR %d has %d bytes, want 32", i, len(v))
		}
	}
	if len(values) != len(indexes) {
		for i := range values {
			if !slices.Contains(indexes, i) {
				return fmt.Errorf("PCR %d is not quoted: want only the values of %s", i, Description)
			}
		}
	}
	return nil
}

// Proto carries PCR values of the quoted bank in go-tpm-tools' message.
func Proto(values map[int][]byte) *pb.PCRs {
	p := &pb.PCRs{Hash: ProtoHash, Pcrs: make(map[uint32][]byte, len(values))}
	for i, v := range values {
		p.Pcrs[uint32(i)] = v
	}
	return p
}

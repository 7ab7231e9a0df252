// Package pcrs defines, once, the PCR selection every attestation covers:
// PCRs 0-9 of the SHA-256 bank. The appliance quotes and reads it
// (tpm/attester, appliance/measuredboot); the brokers and the operator
// verify quotes over it and seal shares to it (tpm/verifier).
package pcrs

import (
	pb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm/legacy/tpm2"
)

// Count is the number of quoted PCRs: 0 to Count-1.
const Count = 10

// Hash is the quoted bank, as the TPM names it.
const Hash = tpm2.AlgSHA256

// ProtoHash is the quoted bank, as go-tpm-tools' messages name it.
const ProtoHash = pb.HashAlgo_SHA256

// Description names the selection in messages.
const Description = "SHA-256 PCRs 0-9"

// Indexes lists the quoted PCRs in ascending order (a fresh slice).
func Indexes() []int {
	out := make([]int, Count)
	for i := range out {
		out[i] = i
	}
	return out
}

// Selection is the quoted PCRs as a TPM selection.
func Selection() tpm2.PCRSelection {
	return tpm2.PCRSelection{Hash: Hash, PCRs: Indexes()}
}

// Proto carries PCR values of the quoted bank in go-tpm-tools' message.
func Proto(values map[int][]byte) *pb.PCRs {
	p := &pb.PCRs{Hash: ProtoHash, Pcrs: make(map[uint32][]byte, len(values))}
	for i, v := range values {
		p.Pcrs[uint32(i)] = v
	}
	return p
}

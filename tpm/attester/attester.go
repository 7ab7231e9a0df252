// Package attester is the appliance side of the attestation protocol: it
// holds the TPM's endorsement key (EK) and an attestation key (AK), answers
// the broker's credential-activation challenge, quotes the PCRs of package
// tpm/pcrs over caller-supplied extraData, and imports secrets sealed to the
// EK and a PCR policy. The verifier side is package tpm/verifier.
package attester

import (
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"io"

	tpmclient "github.com/google/go-tpm-tools/client"
	pb "github.com/google/go-tpm-tools/proto/tpm"
	legacy "github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpmutil"

	"github.com/dataembassy/embassy/tpm/pcrs"
)

// EKType selects the endorsement key algorithm.
type EKType string

// EK types.
const (
	EKRSA EKType = "rsa2048"
	EKECC EKType = "eccp256"
)

// AKHandle is the persistent handle the AK is kept at, so that it is the
// same key on every boot.
const AKHandle = tpmutil.Handle(0x81010010)

// Attester wraps a TPM's EK and AK.
type Attester struct {
	rw     io.ReadWriter
	tpm    transport.TPM // the same TPM, for go-tpm's TPMDirect API
	ekType EKType
	ek     *tpmclient.Key
	ak     *tpmclient.Key

	// For the EK-salted sessions of session.go.
	ekHandle tpm2.TPMHandle
	ekName   tpm2.TPM2BName
	ekPub    tpm2.TPMTPublic
	akName   tpm2.TPM2BName
}

// Open loads the EK of the given type and creates the AK: an ECC P-256
// restricted signing key, a primary key of the endorsement hierarchy, so the
// TPM derives the same key every time and, unlike for owner-hierarchy keys,
// does not obfuscate the reset and restart counts in its quotes (the
// brokers compare them to detect a TPM state rollback).
func Open(rw io.ReadWriter, ekType EKType) (*Attester, error) {
	var ek *tpmclient.Key
	var err error
	switch ekType {
	case EKRSA:
		ek, err = tpmclient.EndorsementKeyRSA(rw)
	case EKECC:
		ek, err = tpmclient.EndorsementKeyECC(rw)
	default:
		return nil, fmt.Errorf("unknown EK type %q", ekType)
	}
	if err != nil {
		return nil, fmt.Errorf("load %s EK: %w", ekType, err)
	}
	ak, err := tpmclient.NewCachedKey(rw, legacy.HandleEndorsement, akTemplate(), AKHandle)
	if err != nil {
		ek.Close()
		return nil, fmt.Errorf("create AK: %w", err)
	}
	a := &Attester{rw: rw, tpm: transport.FromReadWriter(rw), ekType: ekType, ek: ek, ak: ak,
		ekHandle: tpm2.TPMHandle(ek.Handle())}
	if a.ekName, a.ekPub, err = readPublic(a.tpm, ek.Handle()); err != nil {
		a.Close()
		return nil, fmt.Errorf("read EK public area: %w", err)
	}
	if a.akName, _, err = readPublic(a.tpm, ak.Handle()); err != nil {
		a.Close()
		return nil, fmt.Errorf("read AK public area: %w", err)
	}
	return a, nil
}

// akTemplate is go-tpm-tools' ECC AK template with noDA set. The AK is
// used with an empty password at every attestation; without noDA, each
// power cut (an unorderly TPM shutdown) counts as a failed authorization,
// and after a few the TPM's dictionary-attack lockout refuses every quote,
// so a server would stop attesting after repeated power losses. The AK is
// a restricted signing key: noDA does not make it sign anything else.
func akTemplate() legacy.Public {
	t := tpmclient.AKTemplateECC()
	t.Attributes |= legacy.FlagNoDA
	return t
}

// Close flushes the keys from the TPM.
func (a *Attester) Close() {
	a.ak.Close()
	a.ek.Close()
}

// EKPublic returns the EK's public key.
func (a *Attester) EKPublic() crypto.PublicKey { return a.ek.PublicKey() }

// EKPublicDER returns the EK public key in PKIX DER.
func (a *Attester) EKPublicDER() ([]byte, error) {
	return x509.MarshalPKIXPublicKey(a.ek.PublicKey())
}

// EKCertDER returns the EK certificate stored in the TPM's NV RAM, or nil.
func (a *Attester) EKCertDER() []byte { return a.ek.CertDERBytes() }

// AKPublic returns the AK's TPMT_PUBLIC encoding, from which a verifier
// computes the AK's name and checks its attributes.
func (a *Attester) AKPublic() ([]byte, error) {
	return a.ak.PublicArea().Encode()
}

// AKPublicKey returns the AK's public key.
func (a *Attester) AKPublicKey() crypto.PublicKey { return a.ak.PublicKey() }

// Activate answers a credential-activation challenge: the TPM releases the
// secret only if the AK named in the challenge is loaded on the same TPM as
// the EK it was encrypted to. The secret crosses the TPM's bus encrypted
// (session.go).
func (a *Attester) Activate(credBlob, encSecret []byte) ([]byte, error) {
	secret, err := a.activate(credBlob, encSecret)
	if err != nil {
		return nil, fmt.Errorf("activate credential: %w", err)
	}
	return secret, nil
}

// Quote quotes the PCRs of package tpm/pcrs with extraData and returns the quote (TPMS_ATTEST,
// TPMT_SIGNATURE and the PCR values).
func (a *Attester) Quote(extraData []byte) (*pb.Quote, error) {
	if len(extraData) > 64 {
		return nil, errors.New("extraData longer than 64 bytes")
	}
	q, err := a.ak.Quote(pcrs.Selection(), extraData)
	if err != nil {
		return nil, fmt.Errorf("quote: %w", err)
	}
	return q, nil
}

// Import unseals a blob sealed to this TPM's EK and a PCR policy. It fails
// on any other TPM, and on this one once the PCRs differ from the policy.
// The secret crosses the TPM's bus encrypted (session.go); the caller owns
// the returned slice and wipes it when done.
func (a *Attester) Import(blob *pb.ImportBlob) ([]byte, error) {
	secret, err := a.unseal(blob)
	if err != nil {
		return nil, fmt.Errorf("import sealed blob: %w", err)
	}
	return secret, nil
}

// QuotePCRsRead reads the current values of the quoted PCRs, as an
// attestation request carries them.
func QuotePCRsRead(rw io.ReadWriter) (map[int][]byte, error) {
	pcrs, err := tpmclient.ReadPCRs(rw, pcrs.Selection())
	if err != nil {
		return nil, err
	}
	out := map[int][]byte{}
	for i, v := range pcrs.GetPcrs() {
		out[int(i)] = v
	}
	return out, nil
}

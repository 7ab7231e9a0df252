// Package verifier is the verifier side of the attestation protocol, run by
// the home-state key brokers: EK certificate checks, the AK's name and
// credential-activation challenge (MakeCredential), quote verification with
// the TPM clock, and sealing secrets to an EK plus a PCR policy. Event-log
// replay and manifest comparison are in package tpm/eventlog.
package verifier

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"

	pb "github.com/google/go-tpm-tools/proto/tpm"
	tpmquote "github.com/google/go-tpm-tools/quote"
	tpmserver "github.com/google/go-tpm-tools/server"
	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/legacy/tpm2/credactivation"

	"github.com/dataembassy/embassy/tpm/pcrs"
)

// Errors callers branch on.
var (
	ErrEKCert      = errors.New("EK certificate does not verify")
	ErrAKPublic    = errors.New("AK public area is not an attestation key")
	ErrQuote       = errors.New("quote does not verify")
	ErrPCRDigest   = errors.New("PCR values do not match the quoted digest")
	ErrExtraData   = errors.New("quote extraData does not match")
	ErrClockUnsafe = errors.New("TPM clock is not marked safe")
	// ErrPCRSelection: a seal's PCR values are not exactly the policy's.
	ErrPCRSelection = errors.New("PCR values are not exactly the policy selection")
)

// VerifyEKCert checks that certDER chains to one of roots (the
// manufacturer-CA bundle) and certifies exactly ekPub.
func VerifyEKCert(certDER []byte, ekPub crypto.PublicKey, roots *x509.CertPool, intermediates *x509.CertPool) (*x509.Certificate, error) {
	if len(certDER) == 0 {
		return nil, fmt.Errorf("%w: the TPM has no EK certificate", ErrEKCert)
	}
	cert, err := x509.ParseCertificate(certDER)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrEKCert, err)
	}
	// EK certificates carry TCG-specific extensions (SAN in directoryName
	// form, EK policy) that Go flags as unhandled critical extensions.
	cert.UnhandledCriticalExtensions = nil
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, Intermediates: intermediates, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrEKCert, err)
	}
	if !samePublicKey(cert.PublicKey, ekPub) {
		return nil, fmt.Errorf("%w: certificate is for another key than the EK", ErrEKCert)
	}
	return cert, nil
}

func samePublicKey(a, b crypto.PublicKey) bool {
	switch k := a.(type) {
	case *rsa.PublicKey:
		return k.Equal(b)
	case *ecdsa.PublicKey:
		return k.Equal(b)
	}
	return false
}

// AK is a decoded attestation key public area.
type AK struct {
	Public    tpm2.Public
	PublicKey crypto.PublicKey
	Name      tpm2.Name
}

// ParseAK decodes a TPMT_PUBLIC and checks it is a restricted signing key
// created inside the TPM (fixedTPM, fixedParent, sensitiveDataOrigin).
func ParseAK(public []byte) (*AK, error) {
	pub, err := tpm2.DecodePublic(public)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrAKPublic, err)
	}
	// The name (what credential activation binds) is SHA-256 of the public
	// area, as the appliance's AK template makes it; another or an unknown
	// name algorithm is refused rather than interpreted.
	if pub.NameAlg != tpm2.AlgSHA256 {
		return nil, fmt.Errorf("%w: name algorithm %v, want SHA-256", ErrAKPublic, pub.NameAlg)
	}
	want := tpm2.FlagFixedTPM | tpm2.FlagFixedParent | tpm2.FlagSensitiveDataOrigin | tpm2.FlagRestricted | tpm2.FlagSign
	if pub.Attributes&want != want || pub.Attributes&tpm2.FlagDecrypt != 0 {
		return nil, fmt.Errorf("%w: attributes %v", ErrAKPublic, pub.Attributes)
	}
	key, err := pub.Key()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrAKPublic, err)
	}
	name, err := pub.Name()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrAKPublic, err)
	}
	return &AK{Public: pub, PublicKey: key, Name: name}, nil
}

// MakeCredential encrypts secret to ekPub so that only a TPM holding both
// that EK and the AK named ak can recover it (TPM2_ActivateCredential).
func MakeCredential(ekPub crypto.PublicKey, ak *AK, secret []byte) (credBlob, encSecret []byte, err error) {
	if ak.Name.Digest == nil {
		return nil, nil, fmt.Errorf("AK name has no digest")
	}
	credBlob, encSecret, err = credactivation.Generate(ak.Name.Digest, ekPub, 16, secret)
	if err != nil {
		return nil, nil, fmt.Errorf("make credential: %w", err)
	}
	// Generate returns TPM2B encodings; TPM2_ActivateCredential takes the
	// contents.
	if credBlob, err = unwrapTPM2B(credBlob); err != nil {
		return nil, nil, err
	}
	if encSecret, err = unwrapTPM2B(encSecret); err != nil {
		return nil, nil, err
	}
	return credBlob, encSecret, nil
}

// QuoteInfo is what a verified quote attests.
type QuoteInfo struct {
	PCRs         map[int][]byte
	ResetCount   uint32
	RestartCount uint32
	Safe         bool
	Clock        uint64
}

// VerifyQuote checks, in this order, that the quote covers the PCRs of
// package tpm/pcrs, exactly (ErrQuote), that the PCR values carried with
// it are exactly those PCRs' and hash to the quoted PCR digest
// (ErrPCRDigest), that the AK signed it (ErrQuote) and that its
// extraData equals extraData (ErrExtraData). It returns the PCR values and
// the TPM clock state.
func VerifyQuote(ak *AK, q *pb.Quote, extraData []byte) (*QuoteInfo, error) {
	if q == nil || len(q.GetQuote()) == 0 || len(q.GetRawSig()) == 0 || q.GetPcrs() == nil {
		return nil, fmt.Errorf("%w: incomplete quote", ErrQuote)
	}
	att, err := tpm2.DecodeAttestationData(q.GetQuote())
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrQuote, err)
	}
	if att.Magic != 0xff544347 || att.Type != tpm2.TagAttestQuote || att.AttestedQuoteInfo == nil {
		return nil, fmt.Errorf("%w: not a TPM-generated quote", ErrQuote)
	}
	sel := att.AttestedQuoteInfo.PCRSelection
	if sel.Hash != pcrs.Hash || !slices.Equal(sel.PCRs, pcrs.Indexes()) {
		return nil, fmt.Errorf("%w: quote covers %v, want %s", ErrQuote, sel, pcrs.Description)
	}
	if q.GetPcrs().GetHash() != pcrs.ProtoHash || len(q.GetPcrs().GetPcrs()) != pcrs.Count {
		return nil, fmt.Errorf("%w: want exactly the %d values of %s", ErrPCRDigest, pcrs.Count, pcrs.Description)
	}
	info := &QuoteInfo{
		PCRs:         map[int][]byte{},
		ResetCount:   att.ClockInfo.ResetCount,
		RestartCount: att.ClockInfo.RestartCount,
		Safe:         att.ClockInfo.Safe == 1,
		Clock:        att.ClockInfo.Clock,
	}
	h := sha256.New()
	for _, i := range sel.PCRs {
		v, ok := q.GetPcrs().GetPcrs()[uint32(i)]
		if !ok || len(v) != sha256.Size {
			return nil, fmt.Errorf("%w: PCR %d missing", ErrPCRDigest, i)
		}
		info.PCRs[i] = v
		h.Write(v)
	}
	if !bytes.Equal(h.Sum(nil), att.AttestedQuoteInfo.PCRDigest) {
		return nil, ErrPCRDigest
	}
	// Signature (and PCR digest again) with the quote's own extraData, so a
	// failure here is the signature.
	if err := tpmquote.Verify(q, ak.PublicKey, att.ExtraData); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrQuote, err)
	}
	if !bytes.Equal(att.ExtraData, extraData) {
		return nil, ErrExtraData
	}
	return info, nil
}

// Seal encrypts secret to ekPub so that the TPM holding that EK releases it
// only while the PCRs of package tpm/pcrs hold exactly values. values must
// hold exactly those PCRs (ErrPCRSelection): a policy over fewer would
// leave a PCR unbound, one over more is not what the appliance quotes.
func Seal(ekPub crypto.PublicKey, secret []byte, values map[int][]byte) (*pb.ImportBlob, error) {
	if err := pcrs.Check(values); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrPCRSelection, err)
	}
	blob, err := tpmserver.CreateImportBlob(ekPub, secret, pcrs.Proto(values))
	if err != nil {
		return nil, fmt.Errorf("seal to EK: %w", err)
	}
	return blob, nil
}

func unwrapTPM2B(b []byte) ([]byte, error) {
	if len(b) < 2 || int(b[0])<<8|int(b[1]) != len(b)-2 {
		return nil, errors.New("malformed TPM2B from credential generation")
	}
	return b[2:], nil
}

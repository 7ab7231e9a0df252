package verifier_test

import (
	"bytes"
	"crypto"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"testing"
	"time"

	"github.com/google/go-attestation/attest"
	pb "github.com/google/go-tpm-tools/proto/tpm"

	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/pcrs"
	"github.com/dataembassy/embassy/tpm/tpmtest"
	"github.com/dataembassy/embassy/tpm/verifier"
)

// tpmValues are real values of a simulated TPM (fixed seed: the same EKs
// and AK in every fuzzing process) and of a manufacturer CA whose Ed25519
// key is derived from a fixed seed, so that certificates issued in one
// fuzzing process verify in another.
type tpmValues struct {
	caKey      ed25519.PrivateKey
	roots      *x509.CertPool
	eks        []crypto.PublicKey // RSA, ECC
	ekDER      [][]byte
	ekCerts    [][]byte
	akPublic   []byte
	quote      *pb.Quote
	extraData  []byte
	otherQuote *pb.Quote // over other PCR values and extraData
}

func newTPMValues(t testing.TB) *tpmValues {
	t.Helper()
	v := &tpmValues{caKey: ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, ed25519.SeedSize))}
	name := pkix.Name{CommonName: "Fuzz TPM Manufacturer"}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: name, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(nil, tmpl, tmpl, v.caKey.Public(), v.caKey)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(der)
	v.roots = x509.NewCertPool()
	v.roots.AddCert(root)

	sim := tpmtest.NewSimulator(t, nil, 1)
	tpmtest.MeasuredBoot(t, sim, tpmtest.NewBootDigests("fuzzed image"))
	for _, typ := range []attester.EKType{attester.EKRSA, attester.EKECC} {
		a, err := attester.Open(sim, typ)
		if err != nil {
			t.Fatal(err)
		}
		ek := a.EKPublic()
		ekDER, err := a.EKPublicDER()
		if err != nil {
			t.Fatal(err)
		}
		leaf := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "TPM EK"}, NotBefore: tmpl.NotBefore,
			NotAfter: tmpl.NotAfter, KeyUsage: x509.KeyUsageKeyEncipherment}
		cert, err := x509.CreateCertificate(nil, leaf, root, ek, v.caKey)
		if err != nil {
			t.Fatal(err)
		}
		v.eks, v.ekDER, v.ekCerts = append(v.eks, ek), append(v.ekDER, ekDER), append(v.ekCerts, cert)
		if typ == attester.EKRSA {
			if v.akPublic, err = a.AKPublic(); err != nil {
				t.Fatal(err)
			}
			extra := sha256.Sum256([]byte("nonce and TLS key"))
			v.extraData = extra[:]
			if v.quote, err = a.Quote(v.extraData); err != nil {
				t.Fatal(err)
			}
			if v.otherQuote, err = a.Quote(v.extraData[:16]); err != nil {
				t.Fatal(err)
			}
		}
		a.Close()
	}
	return v
}

// pcrBlob is the quoted PCR values one after the other, in the order of
// pcrs.Indexes.
func pcrBlob(q *pb.Quote) []byte {
	var b []byte
	for _, i := range pcrs.Indexes() {
		b = append(b, q.GetPcrs().GetPcrs()[uint32(i)]...)
	}
	return b
}

// pcrsOf splits a blob into 32-byte PCR values for the PCRs of
// pcrs.Indexes in order, then for PCR 13, 14 and so on (more than the
// policy); a shorter tail is one more, short, value.
func pcrsOf(b []byte) map[int][]byte {
	out := map[int][]byte{}
	idx := pcrs.Indexes()
	for k := 0; len(b) > 0; k++ {
		i := 13 + k - len(idx)
		if k < len(idx) {
			i = idx[k]
		}
		n := min(len(b), sha256.Size)
		out[i], b = b[:n], b[n:]
	}
	return out
}

// FuzzVerifyQuote verifies arbitrary AK public areas, quotes, signatures,
// PCR values and extraData, seeded with real quotes of a simulated TPM. It
// proves that VerifyQuote never panics and accepts only what
// go-attestation, a verifier we did not write, accepts too: the AK's
// signature over exactly these quote bytes, these PCR values and this
// extraData. A mutated quote, PCR value or extraData is refused.
func FuzzVerifyQuote(f *testing.F) {
	v := newTPMValues(f)
	f.Add(v.akPublic, v.quote.GetQuote(), v.quote.GetRawSig(), pcrBlob(v.quote), v.extraData)
	f.Add(v.akPublic, v.otherQuote.GetQuote(), v.otherQuote.GetRawSig(), pcrBlob(v.otherQuote), v.extraData[:16])
	f.Add(v.akPublic, v.quote.GetQuote(), v.otherQuote.GetRawSig(), pcrBlob(v.quote), v.extraData)
	f.Fuzz(func(t *testing.T, akPublic, quote, sig, pcrValues, extraData []byte) {
		ak, err := verifier.ParseAK(akPublic)
		if err != nil {
			if !errors.Is(err, verifier.ErrAKPublic) {
				t.Fatalf("ParseAK: %v is not ErrAKPublic", err)
			}
			return
		}
		values := pcrsOf(pcrValues)
		info, err := verifier.VerifyQuote(ak, &pb.Quote{Quote: quote, RawSig: sig, Pcrs: pcrs.Proto(values)}, extraData)
		if err != nil {
			for _, want := range []error{verifier.ErrQuote, verifier.ErrPCRDigest, verifier.ErrExtraData} {
				if errors.Is(err, want) {
					return
				}
			}
			t.Fatalf("VerifyQuote: %v is none of its errors", err)
		}
		akPub, err := attest.ParseAKPublic(akPublic)
		if err != nil {
			t.Fatalf("quote accepted under an AK go-attestation cannot parse: %v", err)
		}
		var list []attest.PCR
		for i, d := range values {
			list = append(list, attest.PCR{Index: i, Digest: d, DigestAlg: crypto.SHA256})
		}
		if err := akPub.Verify(attest.Quote{Quote: quote, Signature: sig}, list, extraData); err != nil {
			t.Fatalf("quote accepted that go-attestation refuses: %v", err)
		}
		for i, d := range values {
			if !bytes.Equal(info.PCRs[i], d) {
				t.Fatalf("PCR %d reported as %x, given %x", i, info.PCRs[i], d)
			}
		}
	})
}

// FuzzParseAK decodes arbitrary TPMT_PUBLIC areas, seeded with a real AK
// and EK-shaped variants, and makes a credential challenge for each AK it
// accepts against both real EKs. It proves that ParseAK never panics,
// accepts only restricted signing keys made in the TPM (fixedTPM,
// fixedParent, sensitiveDataOrigin, no decrypt) with a usable key and name,
// and that MakeCredential then never panics.
func FuzzParseAK(f *testing.F) {
	v := newTPMValues(f)
	f.Add(v.akPublic)
	f.Add(v.akPublic[:len(v.akPublic)/2])
	f.Fuzz(func(t *testing.T, public []byte) {
		ak, err := verifier.ParseAK(public)
		if err != nil {
			if !errors.Is(err, verifier.ErrAKPublic) {
				t.Fatalf("ParseAK: %v is not ErrAKPublic", err)
			}
			return
		}
		attrs := ak.Public.Attributes
		for _, flag := range []uint32{0x2, 0x10, 0x20, 0x10000, 0x40000} { // fixedTPM, fixedParent, sensitiveDataOrigin, restricted, sign
			if uint32(attrs)&flag == 0 {
				t.Fatalf("accepted an AK without attribute %#x: %v", flag, attrs)
			}
		}
		if uint32(attrs)&0x20000 != 0 { // decrypt
			t.Fatalf("accepted a decryption key as AK: %v", attrs)
		}
		if ak.PublicKey == nil || ak.Name.Digest == nil {
			t.Fatalf("accepted an AK without a key or a name: %+v", ak)
		}
		for _, ek := range v.eks {
			verifier.MakeCredential(ek, ak, make([]byte, 32))
		}
	})
}

// FuzzVerifyEKCert verifies arbitrary certificates against arbitrary EK
// public keys, seeded with the real EKs of a simulated TPM and their
// certificates from the (fixed-key) manufacturer CA. It proves that
// VerifyEKCert never panics, answers ErrEKCert for every refusal, and
// accepts only a certificate the manufacturer's key signed (checked here
// with ed25519 directly) for exactly the EK given.
func FuzzVerifyEKCert(f *testing.F) {
	v := newTPMValues(f)
	for i := range v.eks {
		f.Add(v.ekCerts[i], v.ekDER[i])
		f.Add(v.ekCerts[i], v.ekDER[1-i])
	}
	f.Fuzz(func(t *testing.T, certDER, ekDER []byte) {
		ek, err := x509.ParsePKIXPublicKey(ekDER)
		if err != nil {
			return
		}
		cert, err := verifier.VerifyEKCert(certDER, ek, v.roots, nil)
		if err != nil {
			if !errors.Is(err, verifier.ErrEKCert) {
				t.Fatalf("VerifyEKCert: %v is not ErrEKCert", err)
			}
			return
		}
		if !ed25519.Verify(v.caKey.Public().(ed25519.PublicKey), cert.RawTBSCertificate, cert.Signature) {
			t.Fatal("accepted a certificate the manufacturer did not sign")
		}
		type equaler interface{ Equal(crypto.PublicKey) bool }
		if k, ok := cert.PublicKey.(equaler); !ok || !k.Equal(ek) {
			t.Fatal("accepted a certificate for another key than the EK")
		}
		known := false
		for _, real := range v.eks {
			known = known || real.(equaler).Equal(ek)
		}
		if !known {
			t.Fatal("accepted an EK certificate for a key that is not the TPM's")
		}
	})
}

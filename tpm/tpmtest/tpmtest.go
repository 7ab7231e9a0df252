// Package tpmtest provides real TPM 2.0 simulators (go-tpm-tools' in-process
// ms-tpm-20-ref build) provisioned like manufactured TPMs: EK certificates
// for the RSA and ECC EKs, signed by a test manufacturer CA, written to the
// standard NV indices. For tests only.
package tpmtest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"math/big"
	"testing"
	"time"

	tpmclient "github.com/google/go-tpm-tools/client"
	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"
)

// CA is a manufacturer certificate authority.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
}

// NewCA makes a manufacturer CA.
func NewCA(t testing.TB, name string) *CA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &CA{Cert: cert, Key: key}
}

// Pool returns a pool holding the CA.
func (c *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c.Cert)
	return p
}

// oidTCGKpEKCertificate is the TCG EK certificate extended key usage.
var oidTCGKpEKCertificate = asn1.ObjectIdentifier{2, 23, 133, 8, 1}

// Issue certifies an EK public key.
func (c *CA) Issue(t testing.TB, ekPub crypto.PublicKey) []byte {
	t.Helper()
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: "TPM EK"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage:           x509.KeyUsageKeyEncipherment,
		UnknownExtKeyUsage: []asn1.ObjectIdentifier{oidTCGKpEKCertificate},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.Cert, ekPub, c.Key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// NewSimulator starts the simulator as the TPM with the given seed (the
// same seed gives the same EK, so a "machine" can be rebooted), with EK
// certificates signed by ca (nil: none). Only one simulator can run in a
// process at a time: close it (Close, or the test's end) before the next.
func NewSimulator(t testing.TB, ca *CA, seed int64) *simulator.Simulator {
	t.Helper()
	sim, err := simulator.GetWithFixedSeedInsecure(seed)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if !sim.IsClosed() {
			sim.Close()
		}
	})
	if ca == nil {
		return sim
	}
	for _, ek := range []struct {
		load func(rw interface {
			Read([]byte) (int, error)
			Write([]byte) (int, error)
		}) (*tpmclient.Key, error)
		index uint32
	}{
		{func(rw interface {
			Read([]byte) (int, error)
			Write([]byte) (int, error)
		}) (*tpmclient.Key, error) {
			return tpmclient.EndorsementKeyRSA(rw)
		}, tpmclient.EKCertNVIndexRSA},
		{func(rw interface {
			Read([]byte) (int, error)
			Write([]byte) (int, error)
		}) (*tpmclient.Key, error) {
			return tpmclient.EndorsementKeyECC(rw)
		}, tpmclient.EKCertNVIndexECC},
	} {
		k, err := ek.load(sim)
		if err != nil {
			t.Fatal(err)
		}
		der := ca.Issue(t, k.PublicKey())
		k.Close()
		writeNV(t, sim, tpmutil.Handle(ek.index), der)
	}
	return sim
}

func writeNV(t testing.TB, rw interface {
	Read([]byte) (int, error)
	Write([]byte) (int, error)
}, idx tpmutil.Handle, data []byte) {
	t.Helper()
	attrs := tpm2.AttrOwnerWrite | tpm2.AttrOwnerRead | tpm2.AttrAuthRead | tpm2.AttrPPRead | tpm2.AttrNoDA
	if err := tpm2.NVDefineSpace(rw, tpm2.HandleOwner, idx, "", "", nil, attrs, uint16(len(data))); err != nil {
		t.Fatalf("define EK cert NV index: %v", err)
	}
	for off := 0; off < len(data); off += 512 {
		end := min(off+512, len(data))
		if err := tpm2.NVWrite(rw, tpm2.HandleOwner, idx, "", data[off:end], uint16(off)); err != nil {
			t.Fatalf("write EK cert: %v", err)
		}
	}
}

func tpmutilHandle(pcr int) tpmutil.Handle { return tpmutil.Handle(pcr) }

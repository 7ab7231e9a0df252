package pki

import (
	"bytes"
	"crypto"
	"crypto/ed25519"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"
	"net"
	"time"
)

// This file issues a service CA's leaf certificates when the CA's key is
// an in-process Ed25519 key, as x509.CreateCertificate would, minus the
// check CreateCertificate makes of every signature it obtains (an Ed25519
// verification, three times the signing's cost, at every attestation).
// That check is there for signers outside the process (a PKCS#11 token
// that misbehaves); those still go through CreateCertificate. For Go's
// own Ed25519 it guards against a fault in the signing, whose danger is
// a faulty and a correct signature of the same message (together they
// give the key away): every certificate here has a fresh random 127-bit
// serial, so no message is signed twice, and a certificate with a bad
// signature fails whoever verifies the chain (the appliance's peers).
// The DER is
// byte for byte what CreateCertificate makes of the same template, key
// and parent: the structures below are crypto/x509's own, marshalled by
// encoding/asn1 as it does, and TestLeafEd25519SameAsX509 and
// FuzzLeafEd25519SameAsX509 hold the two to equality (Ed25519 signatures
// are deterministic, so the whole certificate compares).

// Object identifiers of what a leafSpec says (RFC 5280, RFC 8410).
var (
	oidSignatureEd25519    = asn1.ObjectIdentifier{1, 3, 101, 112}
	oidExtensionKeyUsage   = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidExtensionExtKeyUse  = asn1.ObjectIdentifier{2, 5, 29, 37}
	oidExtensionAuthKeyID  = asn1.ObjectIdentifier{2, 5, 29, 35}
	oidExtensionSubjectAlt = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidExtKeyUsageServer   = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 3, 1}
	oidExtKeyUsageClient   = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 3, 2}
)

// emptyASN1Subject is an empty Name (an empty SEQUENCE).
var emptyASN1Subject = []byte{0x30, 0}

type tbsCertificate struct {
	Version            int `asn1:"optional,explicit,default:0,tag:0"`
	SerialNumber       *big.Int
	SignatureAlgorithm pkix.AlgorithmIdentifier
	Issuer             asn1.RawValue
	Validity           validity
	Subject            asn1.RawValue
	PublicKey          asn1.RawValue    // SubjectPublicKeyInfo, as x509.MarshalPKIXPublicKey makes it
	Extensions         []pkix.Extension `asn1:"omitempty,optional,explicit,tag:3"`
}

type validity struct {
	NotBefore, NotAfter time.Time
}

type certificate struct {
	TBSCertificate     asn1.RawValue
	SignatureAlgorithm pkix.AlgorithmIdentifier
	SignatureValue     asn1.BitString
}

type authKeyID struct {
	ID []byte `asn1:"optional,tag:0"`
}

// leafSpec is what a leaf certificate says besides its key: LeafDER's
// fields, with the names already split into DNS names and IP addresses.
type leafSpec struct {
	serial              *big.Int
	commonName          string
	notBefore, notAfter time.Time
	dnsNames            []string
	ipAddresses         []net.IP
}

// template is the x509.Certificate template CreateCertificate makes the
// same certificate from.
func (s leafSpec) template() *x509.Certificate {
	return &x509.Certificate{
		SerialNumber: s.serial, Subject: pkix.Name{CommonName: s.commonName},
		NotBefore: s.notBefore, NotAfter: s.notAfter,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:    s.dnsNames, IPAddresses: s.ipAddresses,
	}
}

// leafEd25519 is x509.CreateCertificate(rand, s.template(), p.Cert, pub,
// key), without re-verifying the signature it makes.
func (p *Issuer) leafEd25519(s leafSpec, pub crypto.PublicKey, key ed25519.PrivateKey) ([]byte, error) {
	if s.serial == nil || s.serial.Sign() < 0 {
		return nil, errors.New("x509: serial number must be positive")
	}
	if !key.Public().(ed25519.PublicKey).Equal(p.Cert.PublicKey) {
		return nil, errors.New("x509: provided PrivateKey doesn't match parent's PublicKey")
	}
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, err
	}
	subject, err := asn1.Marshal(pkix.Name{CommonName: s.commonName}.ToRDNSequence())
	if err != nil {
		return nil, err
	}
	issuer := p.Cert.RawSubject

	// The extensions in x509's order: key usage, extended key usage,
	// authority key id, subject alternative names.
	ku, err := asn1.Marshal(asn1.BitString{Bytes: []byte{0x80}, BitLength: 1}) // digitalSignature
	if err != nil {
		return nil, err
	}
	eku, err := asn1.Marshal([]asn1.ObjectIdentifier{oidExtKeyUsageServer, oidExtKeyUsageClient})
	if err != nil {
		return nil, err
	}
	exts := []pkix.Extension{
		{Id: oidExtensionKeyUsage, Critical: true, Value: ku},
		{Id: oidExtensionExtKeyUse, Value: eku},
	}
	if !bytes.Equal(issuer, subject) && len(p.Cert.SubjectKeyId) > 0 {
		aki, err := asn1.Marshal(authKeyID{p.Cert.SubjectKeyId})
		if err != nil {
			return nil, err
		}
		exts = append(exts, pkix.Extension{Id: oidExtensionAuthKeyID, Value: aki})
	}
	if len(s.dnsNames) > 0 || len(s.ipAddresses) > 0 {
		var names []asn1.RawValue
		for _, n := range s.dnsNames {
			for i := range len(n) {
				if n[i] > 0x7f {
					return nil, fmt.Errorf("x509: %q cannot be encoded as an IA5String", n)
				}
			}
			names = append(names, asn1.RawValue{Tag: 2, Class: asn1.ClassContextSpecific, Bytes: []byte(n)})
		}
		for _, ip := range s.ipAddresses {
			if v4 := ip.To4(); v4 != nil {
				ip = v4
			}
			names = append(names, asn1.RawValue{Tag: 7, Class: asn1.ClassContextSpecific, Bytes: ip})
		}
		san, err := asn1.Marshal(names)
		if err != nil {
			return nil, err
		}
		// Critical when the subject is empty (RFC 5280, 4.2.1.6).
		exts = append(exts, pkix.Extension{Id: oidExtensionSubjectAlt, Critical: bytes.Equal(subject, emptyASN1Subject), Value: san})
	}

	alg := pkix.AlgorithmIdentifier{Algorithm: oidSignatureEd25519}
	tbs, err := asn1.Marshal(tbsCertificate{
		Version:            2,
		SerialNumber:       s.serial,
		SignatureAlgorithm: alg,
		Issuer:             asn1.RawValue{FullBytes: issuer},
		Validity:           validity{s.notBefore.UTC(), s.notAfter.UTC()},
		Subject:            asn1.RawValue{FullBytes: subject},
		PublicKey:          asn1.RawValue{FullBytes: spki},
		Extensions:         exts,
	})
	if err != nil {
		return nil, err
	}
	sig := ed25519.Sign(key, tbs)
	return asn1.Marshal(certificate{
		TBSCertificate:     asn1.RawValue{FullBytes: tbs},
		SignatureAlgorithm: alg,
		SignatureValue:     asn1.BitString{Bytes: sig, BitLength: 8 * len(sig)},
	})
}

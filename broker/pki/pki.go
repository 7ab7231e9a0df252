// Package pki issues the certificates of the broker side: a broker's TLS
// server certificate and its service CA (both under the home state's broker
// CA), and the short-lived certificates a service CA issues to attested
// appliances for their ephemeral TLS keys.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"time"
)

// Issuer is a CA certificate and its key.
type Issuer struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

// NewKey makes an ECDSA P-256 key.
func NewKey() (*ecdsa.PrivateKey, error) {
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

// NewRootCA makes a self-signed CA with a fresh ECDSA P-256 key.
func NewRootCA(name string, validity time.Duration) (*Issuer, error) {
	key, err := NewKey()
	if err != nil {
		return nil, err
	}
	return RootCA(name, validity, key)
}

// RootCA makes a self-signed CA whose key is key (e.g. one held in a
// PKCS#11 token).
func RootCA(name string, validity time.Duration, key crypto.Signer) (*Issuer, error) {
	tmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(validity),
		IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &Issuer{Cert: cert, Key: key}, nil
}

// NewIntermediate issues a CA under parent that may only issue leaf
// certificates (path length 0). Its key is Ed25519: a broker's service CA
// signs a certificate at every attestation, and Ed25519 signs and verifies
// faster than ECDSA P-256.
func (p *Issuer) NewIntermediate(name string, validity time.Duration) (*Issuer, error) {
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	return p.Intermediate(name, validity, key)
}

// Intermediate issues a CA under parent for key (e.g. one held in a
// PKCS#11 token) that may only issue leaf certificates (path length 0).
func (p *Issuer) Intermediate(name string, validity time.Duration, key crypto.Signer) (*Issuer, error) {
	tmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(validity),
		IsCA: true, BasicConstraintsValid: true, MaxPathLenZero: true,
		KeyUsage:    x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.Cert, key.Public(), p.Key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &Issuer{Cert: cert, Key: key}, nil
}

// Leaf issues a certificate for pub. hosts become DNS or IP SANs; the
// certificate is good for both TLS server and client authentication.
func (p *Issuer) Leaf(commonName string, hosts []string, pub crypto.PublicKey, validity time.Duration) (*x509.Certificate, error) {
	der, _, err := p.LeafDER(commonName, hosts, pub, validity)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// LeafDER is Leaf returning the certificate's DER and its expiry, without
// parsing it back (a service CA issues one at every attestation).
func (p *Issuer) LeafDER(commonName string, hosts []string, pub crypto.PublicKey, validity time.Duration) ([]byte, time.Time, error) {
	tmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: commonName},
		NotBefore: time.Now().Add(-5 * time.Minute), NotAfter: time.Now().Add(validity),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	if tmpl.NotAfter.After(p.Cert.NotAfter) {
		tmpl.NotAfter = p.Cert.NotAfter
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.Cert, pub, p.Key)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("issue certificate for %s: %w", commonName, err)
	}
	// The encoding keeps whole seconds, in UTC.
	return der, tmpl.NotAfter.UTC().Truncate(time.Second), nil
}

// TLSCertificate builds a tls.Certificate from a leaf, its key and chain.
func TLSCertificate(leaf *x509.Certificate, key crypto.Signer, chain ...*x509.Certificate) tls.Certificate {
	c := tls.Certificate{PrivateKey: key, Leaf: leaf, Certificate: [][]byte{leaf.Raw}}
	for _, ch := range chain {
		c.Certificate = append(c.Certificate, ch.Raw)
	}
	return c
}

// WritePEM writes a certificate and optionally its key.
func WritePEM(certPath string, cert *x509.Certificate, keyPath string, key crypto.Signer) error {
	if err := os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), 0o644); err != nil {
		return err
	}
	if keyPath == "" {
		return nil
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
}

// LoadIssuer reads a CA certificate and key from PEM files.
func LoadIssuer(certPath, keyPath string) (*Issuer, error) {
	cert, err := LoadCert(certPath)
	if err != nil {
		return nil, err
	}
	kb, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, fmt.Errorf("read CA key: %w", err)
	}
	block, _ := pem.Decode(kb)
	if block == nil {
		return nil, fmt.Errorf("%s: no PEM key", keyPath)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", keyPath, err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("%s: not a signing key", keyPath)
	}
	return &Issuer{Cert: cert, Key: signer}, nil
}

// LoadCert reads one PEM certificate.
func LoadCert(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read certificate: %w", err)
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%s: no PEM certificate", path)
	}
	return x509.ParseCertificate(block.Bytes)
}

// LoadPool reads a PEM bundle into a pool.
func LoadPool(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read CA bundle: %w", err)
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%s holds no certificate", path)
	}
	return p, nil
}

// Pool returns a pool holding the issuer's certificate.
func (p *Issuer) Pool() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(p.Cert)
	return pool
}

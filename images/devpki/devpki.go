// Package devpki creates the local-default certificate authorities (each
// broker's own root CA, the home-state client and operator CAs) in the cache folder on first use. They stand
// in for the home state's real PKI in the demo and in tests; a production
// build passes its own CA bundles to mkimage.
package devpki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"time"
)

// CA is a certificate authority kept as two PEM files.
type CA struct {
	CertPath string
	KeyPath  string
}

// BrokerCA returns broker's own local-default root CA under dir (files
// <broker>-ca.pem and .key), creating it if missing. Each broker has its
// own: mkimage pins each in the image, and the demo's and the tests'
// brokers each take theirs.
func BrokerCA(dir, broker string) (CA, error) {
	return Ensure(dir, broker+"-ca", "embassy local "+broker+" root CA")
}

// Ensure returns the CA called name under dir, creating it if missing.
func Ensure(dir, name, commonName string) (CA, error) {
	ca := CA{CertPath: filepath.Join(dir, name+".pem"), KeyPath: filepath.Join(dir, name+".key")}
	if _, err := os.Stat(ca.CertPath); err == nil {
		return ca, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return ca, fmt.Errorf("create PKI folder: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return ca, fmt.Errorf("generate %s key: %w", name, err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return ca, err
	}
	now := time.Now().UTC()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: commonName, Organization: []string{"embassy local default"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return ca, fmt.Errorf("create %s certificate: %w", name, err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return ca, err
	}
	if err := os.WriteFile(ca.KeyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return ca, fmt.Errorf("write %s key: %w", name, err)
	}
	tmp := ca.CertPath + ".tmp"
	if err := os.WriteFile(tmp, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return ca, fmt.Errorf("write %s certificate: %w", name, err)
	}
	return ca, os.Rename(tmp, ca.CertPath)
}

// EnsureLeaf returns name.pem/name.key under dir: a client certificate for
// commonName issued by ca, created on first use.
func EnsureLeaf(dir, name, commonName string, ca CA) (certPath, keyPath string, err error) {
	certPath, keyPath = filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key")
	if _, err := os.Stat(certPath); err == nil {
		return certPath, keyPath, nil
	}
	caCertPEM, err := os.ReadFile(ca.CertPath)
	if err != nil {
		return "", "", err
	}
	caKeyPEM, err := os.ReadFile(ca.KeyPath)
	if err != nil {
		return "", "", err
	}
	cb, _ := pem.Decode(caCertPEM)
	kb, _ := pem.Decode(caKeyPEM)
	if cb == nil || kb == nil {
		return "", "", fmt.Errorf("CA %s is not PEM", ca.CertPath)
	}
	caCert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return "", "", err
	}
	caKey, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		return "", "", err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", err
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: commonName},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().AddDate(1, 0, 0),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		return "", "", err
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return "", "", err
	}
	return certPath, keyPath, os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

// Package imagekey loads and creates the ed25519 image-signing keys that
// sign appliance manifests. Keys are PEM files: PKCS#8 for the private key,
// PKIX for the public key.
package imagekey

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// LoadPrivate reads a PKCS#8 PEM ed25519 private key.
func LoadPrivate(path string) (ed25519.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read image-signing key: %w", err)
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("image-signing key %s: no PEM \"PRIVATE KEY\" block", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("image-signing key %s: %w", path, err)
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("image-signing key %s is a %T, want ed25519", path, k)
	}
	return priv, nil
}

// ParsePublic decodes a PKIX PEM ed25519 public key.
func ParsePublic(b []byte) (ed25519.PublicKey, error) {
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "PUBLIC KEY" {
		return nil, errors.New("no PEM \"PUBLIC KEY\" block")
	}
	k, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		return nil, err
	}
	pub, ok := k.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("public key is a %T, want ed25519", k)
	}
	return pub, nil
}

// LoadPublic reads a PKIX PEM ed25519 public key.
func LoadPublic(path string) (ed25519.PublicKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read image-signing public key: %w", err)
	}
	pub, err := ParsePublic(b)
	if err != nil {
		return nil, fmt.Errorf("image-signing public key %s: %w", path, err)
	}
	return pub, nil
}

// EncodePublic returns the PKIX PEM encoding of pub.
func EncodePublic(pub ed25519.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), nil
}

// EnsureDev returns the development key at privPath, generating it (and
// its public half at privPath+".pub") on first use. Only for the local
// default: a production key is always passed explicitly.
func EnsureDev(privPath string) (ed25519.PrivateKey, error) {
	if _, err := os.Stat(privPath); err == nil {
		return LoadPrivate(privPath)
	}
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate dev image key: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, err
	}
	pubPEM, err := EncodePublic(pub)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(privPath), 0o700); err != nil {
		return nil, fmt.Errorf("create key folder: %w", err)
	}
	if err := os.WriteFile(privPath+".pub", pubPEM, 0o644); err != nil {
		return nil, fmt.Errorf("write dev public key: %w", err)
	}
	tmp := privPath + ".tmp"
	if err := os.WriteFile(tmp, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return nil, fmt.Errorf("write dev image key: %w", err)
	}
	if err := os.Rename(tmp, privPath); err != nil {
		return nil, fmt.Errorf("install dev image key: %w", err)
	}
	return priv, nil
}

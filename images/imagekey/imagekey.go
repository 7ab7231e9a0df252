// Package imagekey loads and creates the ed25519 image-signing keys that
// sign appliance manifests. Keys are PEM files: PKCS#8 for the private key,
// PKIX for the public key.
package imagekey

import (
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"

	"github.com/dataembassy/embassy/internal/edkey"
)

// LoadPrivate reads a PKCS#8 PEM ed25519 private key.
func LoadPrivate(path string) (ed25519.PrivateKey, error) {
	return edkey.LoadPrivate(path, "image-signing key")
}

// ParsePublic decodes a PKIX PEM ed25519 public key.
func ParsePublic(b []byte) (ed25519.PublicKey, error) { return edkey.ParsePublic(b) }

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
func EncodePublic(pub ed25519.PublicKey) ([]byte, error) { return edkey.EncodePublic(pub) }

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
	privPEM, err := edkey.EncodePrivate(priv)
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
	if err := os.WriteFile(tmp, privPEM, 0o600); err != nil {
		return nil, fmt.Errorf("write dev image key: %w", err)
	}
	if err := os.Rename(tmp, privPath); err != nil {
		return nil, fmt.Errorf("install dev image key: %w", err)
	}
	return priv, nil
}

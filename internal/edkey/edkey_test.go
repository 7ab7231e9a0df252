package edkey

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRoundTripAndRefusals(t *testing.T) {
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	dir := t.TempDir()
	privPEM, err := EncodePrivate(priv)
	if err != nil {
		t.Fatal(err)
	}
	pubPEM, err := EncodePublic(pub)
	if err != nil {
		t.Fatal(err)
	}
	good := filepath.Join(dir, "good.key")
	os.WriteFile(good, privPEM, 0o600)
	if got, err := LoadPrivate(good, "test key"); err != nil || !got.Equal(priv) {
		t.Fatalf("LoadPrivate: %v", err)
	}
	if got, err := ParsePublic(pubPEM); err != nil || !got.Equal(pub) {
		t.Fatalf("ParsePublic: %v", err)
	}
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ecDER, _ := x509.MarshalPKCS8PrivateKey(ec)
	ecPubDER, _ := x509.MarshalPKIXPublicKey(&ec.PublicKey)
	for _, c := range []struct {
		name, data, want string
	}{
		{"not PEM", "junk", "no PEM"},
		{"public key as private", string(pubPEM), "no PEM"},
		{"ECDSA key", string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: ecDER})), "want ed25519"},
		{"bad DER", string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{1, 2}})), "test key"},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, "k")
			os.WriteFile(p, []byte(c.data), 0o600)
			if _, err := LoadPrivate(p, "test key"); err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("LoadPrivate = %v, want an error naming %q", err, c.want)
			}
		})
	}
	if _, err := LoadPrivate(filepath.Join(dir, "missing"), "test key"); err == nil {
		t.Fatal("a missing file loaded")
	}
	if _, err := ParsePublic(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: ecPubDER})); err == nil {
		t.Fatal("an ECDSA public key parsed as ed25519")
	}
}

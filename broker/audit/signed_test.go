package audit

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSignedHead: a signed head verifies under its key only, and a change
// to any field it names breaks the signature.
func TestSignedHead(t *testing.T) {
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	other, _, _ := ed25519.GenerateKey(rand.Reader)
	head := Head{Seq: 7, Hash: strings.Repeat("ab", 32)}
	s, err := SignHead(priv, "broker-a", head, time.Date(2030, 1, 2, 3, 4, 5, 678912345, time.FixedZone("x", 3600)))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Verify(pub); err != nil {
		t.Fatalf("untouched head: %v", err)
	}
	if s.Time.Location() != time.UTC || s.Time.Nanosecond() != 678000000 {
		t.Fatalf("time not UTC to the millisecond: %v", s.Time)
	}
	tests := []struct {
		name string
		edit func(s *SignedHead)
		key  ed25519.PublicKey
	}{
		{"another key", func(*SignedHead) {}, other},
		{"no key", func(*SignedHead) {}, nil},
		{"another broker", func(s *SignedHead) { s.Broker = "broker-b" }, pub},
		{"another sequence number", func(s *SignedHead) { s.Seq++ }, pub},
		{"another hash", func(s *SignedHead) { s.Hash = strings.Repeat("cd", 32) }, pub},
		{"a hash that is not hex", func(s *SignedHead) { s.Hash = "zz" }, pub},
		{"another time", func(s *SignedHead) { s.Time = s.Time.Add(time.Millisecond) }, pub},
		{"a flipped signature bit", func(s *SignedHead) { s.Signature[5] ^= 1 }, pub},
		{"a short signature", func(s *SignedHead) { s.Signature = s.Signature[:10] }, pub},
		{"no broker", func(s *SignedHead) { s.Broker = "" }, pub},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := *s
			c.Signature = bytes.Clone(s.Signature)
			tc.edit(&c)
			if err := c.Verify(tc.key); !errors.Is(err, ErrBadSignature) {
				t.Fatalf("accepted: %v", err)
			}
		})
	}
}

func TestSignedHeadMatches(t *testing.T) {
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, Head{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	empty, err := SignHead(priv, "b", l.Head(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if !empty.Matches(nil) {
		t.Fatal("the empty log's head does not match it")
	}
	head, _ := l.Append(Entry{Event: "enroll", Result: "ok"}, Entry{Event: "revoke", Result: "ok"})
	entries, _ := l.Entries()
	s, _ := SignHead(priv, "b", head, time.Now())
	if !s.Matches(entries) || s.Matches(entries[:1]) || empty.Matches(entries) {
		t.Fatal("Matches does not compare with the last entry")
	}
}

func TestSigningKeyFiles(t *testing.T) {
	dir := t.TempDir()
	pub, err := CreateSigningKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := CreateSigningKey(dir); err == nil {
		t.Fatal("an existing audit signing key was replaced")
	}
	priv, err := LoadSigningKey(filepath.Join(dir, SigningKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	pemPub, _ := os.ReadFile(filepath.Join(dir, SigningPubKeyFile))
	got, err := ParsePublicKey(pemPub)
	if err != nil || !got.Equal(pub) || !priv.Public().(ed25519.PublicKey).Equal(pub) {
		t.Fatalf("public key file: %v", err)
	}
	if fi, _ := os.Stat(filepath.Join(dir, SigningKeyFile)); fi.Mode().Perm() != 0o600 {
		t.Fatalf("key mode %v", fi.Mode())
	}
	if _, err := LoadSigningKey(filepath.Join(dir, SigningPubKeyFile)); err == nil {
		t.Fatal("a public key loaded as the signing key")
	}
	if _, err := ParsePublicKey([]byte("junk")); err == nil {
		t.Fatal("junk parsed as a public key")
	}
}

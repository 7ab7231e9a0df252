package seal_test

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"testing"

	"github.com/dataembassy/embassy/broker/seal"
)

func TestFileKey(t *testing.T) {
	key := make([]byte, 32)
	rand.Read(key)
	k, err := seal.NewFileKey(key)
	if err != nil {
		t.Fatal(err)
	}
	other, _ := seal.NewFileKey(make([]byte, 32))
	plain, aad := []byte("a share"), []byte("appliance/disk-1")
	sealed, err := k.Seal(plain, aad)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(sealed, seal.Header(seal.File)) {
		t.Fatalf("sealed record does not start with the file header: %x", sealed[:8])
	}
	// An unversioned record: nonce | ciphertext, aad only.
	block, _ := aes.NewCipher(key)
	aead, _ := cipher.NewGCM(block)
	nonce := make([]byte, 12)
	rand.Read(nonce)
	legacy := aead.Seal(append([]byte(nil), nonce...), nonce, plain, aad)
	// A record claiming the PKCS#11 backend.
	pkcs11 := append(seal.Header(seal.PKCS11), sealed[seal.HeaderSize:]...)
	// The file header swapped for another version.
	flipped := append([]byte(nil), sealed...)
	flipped[0] ^= 1

	tests := []struct {
		name    string
		k       *seal.FileKey
		sealed  []byte
		aad     []byte
		wantErr error // nil: opens to plain
		backend bool  // want a *WrongBackendError
	}{
		{"round trip", k, sealed, aad, nil, false},
		{"unversioned record", k, legacy, aad, nil, false},
		{"other aad", k, sealed, []byte("appliance/disk-2"), seal.ErrNotAuthentic, false},
		{"other key", other, sealed, aad, seal.ErrNotAuthentic, false},
		{"sealed in a PKCS#11 token", k, pkcs11, aad, nil, true},
		{"truncated", k, sealed[:seal.HeaderSize+4], aad, seal.ErrMalformed, false},
		{"header altered", k, flipped, aad, seal.ErrNotAuthentic, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.k.Open(tc.sealed, tc.aad)
			var wb *seal.WrongBackendError
			switch {
			case tc.backend:
				if !errors.As(err, &wb) || wb.Sealed != seal.PKCS11 || wb.Opener != seal.File {
					t.Fatalf("got %v, want a wrong-backend error", err)
				}
			case tc.wantErr != nil:
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("got %v, want %v", err, tc.wantErr)
				}
			case err != nil || !bytes.Equal(got, plain):
				t.Fatalf("got %q, %v", got, err)
			}
		})
	}
}

func TestNonceFresh(t *testing.T) {
	k, _ := seal.NewFileKey(make([]byte, 32))
	a, _ := k.Seal([]byte("x"), nil)
	b, _ := k.Seal([]byte("x"), nil)
	if bytes.Equal(a, b) {
		t.Fatal("two seals of the same share are equal: nonce reused")
	}
	if _, err := seal.NewFileKey(make([]byte, 16)); err == nil {
		t.Fatal("a 16-byte master key was accepted")
	}
}

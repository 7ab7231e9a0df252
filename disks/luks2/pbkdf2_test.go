package luks2

import (
	"bytes"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"hash"
	"testing"

	"golang.org/x/crypto/pbkdf2"
)

// TestPBKDF2MatchesReference compares pbkdf2Key with golang.org/x/crypto's
// PBKDF2 (and RFC 6070's published SHA-1 vector) for each hash a LUKS2
// header may name, short and longer-than-a-block passwords, and key
// lengths that are and are not multiples of the hash size.
func TestPBKDF2MatchesReference(t *testing.T) {
	long := bytes.Repeat([]byte("passphrase"), 20) // 200 bytes, over every block size
	for _, tc := range []struct {
		name     string
		h        func() hash.Hash
		password []byte
		iter     int
		keyLen   int
	}{
		{"sha1 rfc6070", sha1.New, []byte("password"), 2, 20},
		{"sha256 luks slot key", sha256.New, bytes.Repeat([]byte{7}, 32), 1000, 64},
		{"sha256 digest", sha256.New, bytes.Repeat([]byte{9}, 64), 1000, 32},
		{"sha256 odd length", sha256.New, []byte("x"), 3, 45},
		{"sha256 long password", sha256.New, long, 5, 32},
		{"sha512 long password", sha512.New, long, 5, 100},
		{"sha512 empty password", sha512.New, nil, 1, 64},
	} {
		t.Run(tc.name, func(t *testing.T) {
			salt := []byte("salt of " + tc.name)
			got, err := pbkdf2Key(tc.h, tc.password, salt, tc.iter, tc.keyLen)
			if err != nil {
				t.Fatal(err)
			}
			if want := pbkdf2.Key(tc.password, salt, tc.iter, tc.keyLen, tc.h); !bytes.Equal(got, want) {
				t.Fatalf("got %x, want %x", got, want)
			}
		})
	}
	// RFC 6070, test 2: P="password", S="salt", c=2, dkLen=20.
	got, _ := pbkdf2Key(sha1.New, []byte("password"), []byte("salt"), 2, 20)
	if want := []byte{0xea, 0x6c, 0x01, 0x4d, 0xc7, 0x2d, 0x6f, 0x8c, 0xcd, 0x1e, 0xd9, 0x2a, 0xce, 0x1d, 0x41, 0xf0, 0xd8, 0xde, 0x89, 0x57}; !bytes.Equal(got, want) {
		t.Fatalf("RFC 6070 vector: %x", got)
	}
	for _, bad := range [][2]int{{0, 32}, {1, 0}} {
		if _, err := pbkdf2Key(sha256.New, nil, nil, bad[0], bad[1]); err == nil {
			t.Errorf("iter %d keyLen %d accepted", bad[0], bad[1])
		}
	}
}

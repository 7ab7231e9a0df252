// Package hsm keeps a broker's master key in a PKCS#11 token (an HSM, or
// SoftHSM2 for tests and demos): an AES-256 key generated inside the token
// with a label, sensitive and not extractable, that seals and opens key
// shares with CKM_AES_GCM inside the token. The key never leaves it; the
// broker holds only a logged-in session.
//
// The broker's CA keys can live there too (Signer): ECDSA P-256 key pairs
// generated in the token (CKM_EC_KEY_PAIR_GEN), the private half
// sensitive and not extractable, that sign digests with CKM_ECDSA inside
// the token as a crypto.Signer for crypto/x509.
//
// Records are in the format of package seal with backend seal.PKCS11: a
// random 12-byte nonce per seal, stored with the ciphertext, and the header
// authenticated as additional data.
//
// The package needs cgo (the PKCS#11 module is loaded with dlopen); built
// without it, Open and GenerateKey return ErrNoCgo.
package hsm

import (
	"errors"
	"fmt"
	"strings"
)

// Config names the token and the key.
type Config struct {
	Module     string // path of the PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so
	TokenLabel string // label of the token holding the key
	PIN        []byte // user PIN; the caller clears it after Open or GenerateKey
	KeyLabel   string // label of the AES key object (CKA_LABEL)
}

// Errors.
var (
	ErrNoCgo         = errors.New("PKCS#11 support needs a keybroker built with cgo")
	ErrTokenNotFound = errors.New("no PKCS#11 token with this label")
	ErrKeyNotFound   = errors.New("no key with this label in the token")
	ErrKeyExists     = errors.New("the token already holds a key with this label")
	ErrAmbiguousKey  = errors.New("the token holds more than one key with this label")
	// ErrKeyExtractable: the key found would let its value out of the
	// token (CKA_SENSITIVE false or CKA_EXTRACTABLE true), or is not of
	// the expected type (an AES-256 master key, an ECDSA P-256 CA key);
	// the broker refuses to use it.
	ErrKeyExtractable = errors.New("the key is extractable or not of the expected type: generate one with `keybroker init --pkcs11-...`")
)

// Check reports the first missing or malformed field.
func (c Config) Check() error {
	switch {
	case c.Module == "":
		return errors.New("PKCS#11 module path missing")
	case c.TokenLabel == "":
		return errors.New("PKCS#11 token label missing")
	case len(c.PIN) == 0:
		return errors.New("PKCS#11 PIN missing (empty PIN file)")
	case c.KeyLabel == "":
		return errors.New("PKCS#11 key label missing")
	case len(c.TokenLabel) > 32:
		return fmt.Errorf("PKCS#11 token label %q longer than 32 bytes", c.TokenLabel)
	case strings.ContainsAny(string(c.PIN), "\r\n"):
		return errors.New("PKCS#11 PIN contains a line break")
	}
	return nil
}

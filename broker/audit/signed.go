package audit

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/dataembassy/embassy/internal/edkey"
)

// Files of the audit signing key in a broker's state folder: the private
// key (PKCS#8 PEM, mode 0600) and its public half (PKIX PEM), which the
// operators pin in their broker list when they add the broker.
const (
	SigningKeyFile    = "audit-signing.key"
	SigningPubKeyFile = "audit-signing.pub"
)

// headDomain separates signed heads from anything else the key could sign.
const headDomain = "embassy audit head v1\x00"

// ErrBadSignature is returned when a signed head does not verify under the
// pinned key.
var ErrBadSignature = errors.New("audit head signature does not verify")

// SignedHead is a broker's statement that its audit log ends at entry Seq
// with hash Hash, at Time, signed with the broker's audit signing key. An
// operator who keeps signed heads can later prove what the log held: a
// rewritten history no longer contains them.
type SignedHead struct {
	Broker    string    `json:"broker"`
	Seq       uint64    `json:"seq"`
	Hash      string    `json:"hash"`
	Time      time.Time `json:"time"`
	Signature []byte    `json:"signature"`
}

// Head returns the sequence number and hash the signed head names.
func (s *SignedHead) Head() Head { return Head{Seq: s.Seq, Hash: s.Hash} }

// message is the canonical encoding that is signed: the domain, the
// broker's name (length-prefixed), the sequence number, the 32-byte hash
// and the time in Unix nanoseconds, integers big-endian.
func (s *SignedHead) message() ([]byte, error) {
	hash, err := hex.DecodeString(s.Hash)
	if err != nil || len(hash) != 32 {
		return nil, fmt.Errorf("audit head hash %q is not 64 hex digits", s.Hash)
	}
	if s.Broker == "" || len(s.Broker) > 255 {
		return nil, fmt.Errorf("audit head broker name must be 1 to 255 bytes, got %d", len(s.Broker))
	}
	var b bytes.Buffer
	b.WriteString(headDomain)
	b.WriteByte(byte(len(s.Broker)))
	b.WriteString(s.Broker)
	binary.Write(&b, binary.BigEndian, s.Seq)
	b.Write(hash)
	binary.Write(&b, binary.BigEndian, s.Time.UnixNano())
	return b.Bytes(), nil
}

// SignHead signs head as broker's at time t (kept to the millisecond, in
// UTC, so it survives a JSON round trip unchanged).
func SignHead(key ed25519.PrivateKey, broker string, head Head, t time.Time) (*SignedHead, error) {
	s := &SignedHead{Broker: broker, Seq: head.Seq, Hash: head.Hash, Time: t.UTC().Truncate(time.Millisecond)}
	if s.Hash == "" {
		s.Hash = genesis // an empty log: the head is the genesis hash at 0
	}
	msg, err := s.message()
	if err != nil {
		return nil, err
	}
	s.Signature = ed25519.Sign(key, msg)
	return s, nil
}

// Verify checks the signature with the broker's pinned public key.
func (s *SignedHead) Verify(pub ed25519.PublicKey) error {
	if len(pub) != ed25519.PublicKeySize {
		return fmt.Errorf("%w: no valid public key to check it with", ErrBadSignature)
	}
	msg, err := s.message()
	if err != nil {
		return fmt.Errorf("%w: %v", ErrBadSignature, err)
	}
	if !ed25519.Verify(pub, msg, s.Signature) {
		return fmt.Errorf("%w under the pinned key of broker %s", ErrBadSignature, s.Broker)
	}
	return nil
}

// Matches reports whether the signed head names the last of entries (the
// genesis hash at 0 for an empty log).
func (s *SignedHead) Matches(entries []Entry) bool {
	if len(entries) == 0 {
		return s.Seq == 0 && s.Hash == genesis
	}
	last := entries[len(entries)-1]
	return s.Seq == last.Seq && s.Hash == last.Hash
}

// CreateSigningKey generates an audit signing key in dir (SigningKeyFile,
// and SigningPubKeyFile for the operators) and returns its public half. It
// refuses to replace an existing key.
func CreateSigningKey(dir string) (ed25519.PublicKey, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate audit signing key: %w", err)
	}
	privPEM, err := edkey.EncodePrivate(priv)
	if err != nil {
		return nil, err
	}
	pubPEM, err := EncodePublicKey(pub)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(dir, SigningKeyFile), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create audit signing key: %w", err)
	}
	_, err = f.Write(privPEM)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("write audit signing key: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, SigningPubKeyFile), pubPEM, 0o644); err != nil {
		return nil, fmt.Errorf("write audit signing public key: %w", err)
	}
	return pub, nil
}

// LoadSigningKey reads the audit signing key (PKCS#8 PEM ed25519) at path.
func LoadSigningKey(path string) (ed25519.PrivateKey, error) {
	return edkey.LoadPrivate(path, "audit signing key")
}

// EncodePublicKey returns the PKIX PEM encoding of an audit public key.
func EncodePublicKey(pub ed25519.PublicKey) ([]byte, error) { return edkey.EncodePublic(pub) }

// ParsePublicKey decodes a PKIX PEM ed25519 audit public key.
func ParsePublicKey(b []byte) (ed25519.PublicKey, error) { return edkey.ParsePublic(b) }

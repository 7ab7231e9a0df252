//go:build !cgo

package hsm

import (
	"crypto"
	"crypto/ecdsa"
	"io"
)

// Sealer is unavailable without cgo.
type Sealer struct{}

// GenerateKey returns ErrNoCgo.
func GenerateKey(Config) error { return ErrNoCgo }

// Open returns ErrNoCgo.
func Open(Config) (*Sealer, error) { return nil, ErrNoCgo }

// Close does nothing.
func (s *Sealer) Close() error { return nil }

// Seal returns ErrNoCgo.
func (s *Sealer) Seal(_, _ []byte) ([]byte, error) { return nil, ErrNoCgo }

// Open returns ErrNoCgo.
func (s *Sealer) Open(_, _ []byte) ([]byte, error) { return nil, ErrNoCgo }

// Signer is unavailable without cgo.
type Signer struct{}

// GenerateSigningKey returns ErrNoCgo.
func GenerateSigningKey(Config) (*ecdsa.PublicKey, error) { return nil, ErrNoCgo }

// DestroySigningKey returns ErrNoCgo.
func DestroySigningKey(Config) error { return ErrNoCgo }

// OpenSigner returns ErrNoCgo.
func OpenSigner(Config) (*Signer, error) { return nil, ErrNoCgo }

// Close does nothing.
func (s *Signer) Close() error { return nil }

// Public returns nil.
func (s *Signer) Public() crypto.PublicKey { return nil }

// Sign returns ErrNoCgo.
func (s *Signer) Sign(io.Reader, []byte, crypto.SignerOpts) ([]byte, error) { return nil, ErrNoCgo }

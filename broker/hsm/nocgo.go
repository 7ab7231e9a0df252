//go:build !cgo

package hsm

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

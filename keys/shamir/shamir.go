// Package shamir splits a secret into n shares of which any k recombine it
// (Shamir's secret sharing over GF(2^8), byte by byte), and encodes shares
// for transport. Fewer than k shares reveal nothing about the secret.
package shamir

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
)

// MaxShares is the largest n: share x-coordinates are 1..255.
const MaxShares = 255

// MaxSecret bounds the secret length.
const MaxSecret = 1024

// Share is one share: its x-coordinate, the threshold it belongs to and
// one y-value per secret byte.
type Share struct {
	X         byte
	Threshold byte
	Y         []byte
}

// GF(2^8) with the AES polynomial x^8+x^4+x^3+x+1, via log/exp tables.
var expTable, logTable = func() (exp [512]byte, log [256]byte) {
	x := byte(1)
	for i := 0; i < 255; i++ {
		exp[i] = x
		log[x] = byte(i)
		// multiply by the generator 3
		x ^= xtime(x)
	}
	for i := 255; i < 512; i++ {
		exp[i] = exp[i-255]
	}
	return
}()

func xtime(b byte) byte {
	r := b << 1
	if b&0x80 != 0 {
		r ^= 0x1b
	}
	return r
}

// mul multiplies in GF(2^8) in constant time with respect to the operands'
// values (table lookups are masked for zero).
func mul(a, b byte) byte {
	r := expTable[int(logTable[a])+int(logTable[b])]
	// zero if either operand is zero
	mask := byte(subtle.ConstantTimeByteEq(a, 0) | subtle.ConstantTimeByteEq(b, 0))
	return r &^ (0 - mask)
}

func inv(a byte) byte {
	return expTable[255-int(logTable[a])]
}

// Split splits secret into n shares with threshold k.
func Split(secret []byte, n, k int) ([]Share, error) {
	if len(secret) == 0 || len(secret) > MaxSecret {
		return nil, fmt.Errorf("secret must be 1 to %d bytes", MaxSecret)
	}
	if k < 1 || n < k || n > MaxShares {
		return nil, fmt.Errorf("invalid threshold %d of %d shares", k, n)
	}
	shares := make([]Share, n)
	for i := range shares {
		shares[i] = Share{X: byte(i + 1), Threshold: byte(k), Y: make([]byte, len(secret))}
	}
	coeffs := make([]byte, k)
	defer clear(coeffs)
	for b, s := range secret {
		coeffs[0] = s
		if _, err := rand.Read(coeffs[1:]); err != nil {
			return nil, fmt.Errorf("random coefficients: %w", err)
		}
		for i := range shares {
			x := shares[i].X
			// Horner evaluation of the polynomial at x.
			var y byte
			for c := k - 1; c >= 0; c-- {
				y = mul(y, x) ^ coeffs[c]
			}
			shares[i].Y[b] = y
		}
	}
	return shares, nil
}

// Combine recovers the secret from at least Threshold distinct shares of
// the same split. Extra shares are ignored.
func Combine(shares []Share) ([]byte, error) {
	if len(shares) == 0 {
		return nil, errors.New("no shares")
	}
	k := int(shares[0].Threshold)
	size := len(shares[0].Y)
	if k < 1 {
		return nil, errors.New("share has threshold 0")
	}
	seen := map[byte]bool{}
	var use []Share
	for _, s := range shares {
		if int(s.Threshold) != k || len(s.Y) != size {
			return nil, errors.New("shares come from different splits")
		}
		if s.X == 0 {
			return nil, errors.New("share with x = 0")
		}
		if seen[s.X] {
			continue
		}
		seen[s.X] = true
		use = append(use, s)
		if len(use) == k {
			break
		}
	}
	if len(use) < k {
		return nil, fmt.Errorf("%d distinct shares, %d needed", len(use), k)
	}
	secret := make([]byte, size)
	// Lagrange basis at 0: l_i = prod_{j!=i} x_j / (x_j - x_i); in GF(2^8)
	// subtraction is xor.
	basis := make([]byte, k)
	for i := range use {
		num, den := byte(1), byte(1)
		for j := range use {
			if i == j {
				continue
			}
			num = mul(num, use[j].X)
			den = mul(den, use[j].X^use[i].X)
		}
		basis[i] = mul(num, inv(den))
	}
	for b := 0; b < size; b++ {
		var v byte
		for i := range use {
			v ^= mul(use[i].Y[b], basis[i])
		}
		secret[b] = v
	}
	return secret, nil
}

// Encoding: "ES1" magic, x, threshold, length (uint16 BE), y bytes.
var magic = []byte("ES1")

// Marshal encodes a share.
func (s Share) Marshal() []byte {
	out := make([]byte, 0, len(magic)+4+len(s.Y))
	out = append(out, magic...)
	out = append(out, s.X, s.Threshold)
	out = binary.BigEndian.AppendUint16(out, uint16(len(s.Y)))
	return append(out, s.Y...)
}

// Parse decodes and validates a share.
func Parse(b []byte) (Share, error) {
	if len(b) < len(magic)+4 || string(b[:3]) != string(magic) {
		return Share{}, errors.New("not an encoded share")
	}
	x, k := b[3], b[4]
	n := int(binary.BigEndian.Uint16(b[5:7]))
	if x == 0 || k == 0 {
		return Share{}, errors.New("share has x or threshold 0")
	}
	if n == 0 || n > MaxSecret || len(b) != 7+n {
		return Share{}, fmt.Errorf("share length %d does not match %d bytes of data", n, len(b)-7)
	}
	return Share{X: x, Threshold: k, Y: append([]byte(nil), b[7:]...)}, nil
}

// Wipe zeroes a share's secret material.
func (s *Share) Wipe() { clear(s.Y) }

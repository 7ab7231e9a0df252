package luks2

import (
	"encoding"
	"encoding/binary"
	"fmt"
	"hash"
)

// pbkdf2Key is PBKDF2 with HMAC over h (RFC 8018), written so that the
// password leaves no copy that cannot be wiped: golang.org/x/crypto/pbkdf2
// turns the password into a string (crypto/pbkdf2 takes one) and
// crypto/hmac copies it again, and both copies stay in Go's heap, out of
// reach, until the memory is reused. A dump of a serving appliance's
// memory found the LUKS passphrase there.
//
// Here the HMAC pads are built in buffers wiped before returning, the
// inner and outer hash states after absorbing them are kept as snapshots
// that are wiped too, and the hash objects are reset at the end, so that
// nothing derived from the password outlives the call but the result.
func pbkdf2Key(h func() hash.Hash, password, salt []byte, iter, keyLen int) ([]byte, error) {
	if iter < 1 || keyLen < 1 {
		return nil, fmt.Errorf("pbkdf2: %d iterations, key length %d", iter, keyLen)
	}
	inner, outer := h(), h()
	defer inner.Reset()
	defer outer.Reset()
	blockSize, size := inner.BlockSize(), inner.Size()
	innerM, ok1 := inner.(encoding.BinaryMarshaler)
	innerU, ok2 := inner.(encoding.BinaryUnmarshaler)
	outerM, ok3 := outer.(encoding.BinaryMarshaler)
	outerU, ok4 := outer.(encoding.BinaryUnmarshaler)
	if !ok1 || !ok2 || !ok3 || !ok4 {
		return nil, fmt.Errorf("pbkdf2: hash cannot snapshot its state")
	}

	pad := make([]byte, blockSize)
	defer clear(pad)
	if len(password) > blockSize {
		inner.Write(password)
		sum := inner.Sum(nil)
		copy(pad, sum)
		clear(sum)
		inner.Reset()
	} else {
		copy(pad, password)
	}
	for i := range pad {
		pad[i] ^= 0x36
	}
	inner.Write(pad)
	for i := range pad {
		pad[i] ^= 0x36 ^ 0x5c
	}
	outer.Write(pad)
	clear(pad)
	innerState, err := innerM.MarshalBinary()
	if err != nil {
		return nil, err
	}
	defer clear(innerState)
	outerState, err := outerM.MarshalBinary()
	if err != nil {
		return nil, err
	}
	defer clear(outerState)

	// prf computes HMAC(password, msg) into out (size bytes).
	prf := func(out []byte, msg ...[]byte) error {
		if err := innerU.UnmarshalBinary(innerState); err != nil {
			return err
		}
		for _, m := range msg {
			inner.Write(m)
		}
		mid := inner.Sum(out[:0])
		if err := outerU.UnmarshalBinary(outerState); err != nil {
			return err
		}
		outer.Write(mid)
		outer.Sum(out[:0])
		return nil
	}

	out := make([]byte, 0, (keyLen+size-1)/size*size)
	u := make([]byte, size)
	defer clear(u)
	t := make([]byte, size)
	defer clear(t)
	var counter [4]byte
	for block := uint32(1); len(out) < keyLen; block++ {
		binary.BigEndian.PutUint32(counter[:], block)
		if err := prf(u, salt, counter[:]); err != nil {
			clear(out)
			return nil, err
		}
		copy(t, u)
		for n := 1; n < iter; n++ {
			if err := prf(u, u); err != nil {
				clear(out)
				return nil, err
			}
			for i := range t {
				t[i] ^= u[i]
			}
		}
		out = append(out, t...)
	}
	clear(out[keyLen:])
	return out[:keyLen], nil
}

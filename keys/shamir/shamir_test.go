package shamir

import (
	"bytes"
	"crypto/rand"
	"math"
	"math/bits"
	"testing"
	"testing/quick"
)

func TestFieldArithmetic(t *testing.T) {
	// Exhaustive: mul agrees with carry-less multiplication mod the AES
	// polynomial, and a*inv(a) = 1.
	slow := func(a, b byte) byte {
		var r uint16
		for i := 0; i < 8; i++ {
			if b&(1<<i) != 0 {
				r ^= uint16(a) << i
			}
		}
		for i := 15; i >= 8; i-- {
			if r&(1<<i) != 0 {
				r ^= 0x11b << (i - 8)
			}
		}
		return byte(r)
	}
	for a := 0; a < 256; a++ {
		for b := 0; b < 256; b++ {
			if mul(byte(a), byte(b)) != slow(byte(a), byte(b)) {
				t.Fatalf("mul(%d,%d)", a, b)
			}
		}
		if a != 0 && mul(byte(a), inv(byte(a))) != 1 {
			t.Fatalf("inv(%d)", a)
		}
	}
	_ = bits.Len
}

// Any k of n shares recombine the secret.
func TestAnyKOfN(t *testing.T) {
	for _, c := range []struct{ n, k int }{{3, 2}, {5, 3}, {1, 1}, {7, 7}, {10, 1}} {
		secret := make([]byte, 32)
		rand.Read(secret)
		shares, err := Split(secret, c.n, c.k)
		if err != nil {
			t.Fatal(err)
		}
		// Every subset of size k.
		for mask := 0; mask < 1<<c.n; mask++ {
			if bits.OnesCount(uint(mask)) != c.k {
				continue
			}
			var sub []Share
			for i := 0; i < c.n; i++ {
				if mask&(1<<i) != 0 {
					sub = append(sub, shares[i])
				}
			}
			got, err := Combine(sub)
			if err != nil || !bytes.Equal(got, secret) {
				t.Fatalf("%d-of-%d subset %b: %v", c.k, c.n, mask, err)
			}
		}
	}
}

func TestPropertyRoundTrip(t *testing.T) {
	f := func(secret []byte, n8, k8 uint8) bool {
		if len(secret) == 0 || len(secret) > MaxSecret {
			return true
		}
		n := int(n8%10) + 1
		k := int(k8)%n + 1
		shares, err := Split(secret, n, k)
		if err != nil {
			return false
		}
		// A random k-subset, in reverse order.
		sub := make([]Share, 0, k)
		for i := n - 1; len(sub) < k; i-- {
			sub = append(sub, shares[i])
		}
		got, err := Combine(sub)
		return err == nil && bytes.Equal(got, secret)
	}
	if err := quick.Check(f, &quick.Config{MaxCount: 500}); err != nil {
		t.Fatal(err)
	}
}

// Fewer than k shares reveal nothing usable: every candidate secret is
// equally consistent with k-1 shares, so completing them with any k-th
// point yields some other secret, and Combine refuses outright.
func TestFewerThanKRevealNothing(t *testing.T) {
	secret := []byte("register master key 0123456789ab")
	shares, err := Split(secret, 3, 2)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Combine(shares[:1]); err == nil {
		t.Fatal("one share of a 2-of-3 split combined")
	}
	// For a single share of a 2-threshold split, each possible secret byte
	// value corresponds to exactly one line through the share's point: count
	// that all 256 candidates for the first byte are reachable.
	s := shares[0]
	reach := map[byte]bool{}
	for y2 := 0; y2 < 256; y2++ {
		forged := Share{X: 200, Threshold: 2, Y: append([]byte{byte(y2)}, make([]byte, len(s.Y)-1)...)}
		got, err := Combine([]Share{{X: s.X, Threshold: 2, Y: s.Y}, forged})
		if err != nil {
			t.Fatal(err)
		}
		reach[got[0]] = true
	}
	if len(reach) != 256 {
		t.Fatalf("one share constrains the first byte to %d values, want all 256", len(reach))
	}
	// The distribution of a share's bytes does not depend on the secret:
	// shares of an all-zero and an all-0xff secret look alike (no byte of a
	// single share equals the secret byte more often than chance).
	zero := make([]byte, MaxSecret)
	sh, err := Split(zero, 2, 2)
	if err != nil {
		t.Fatal(err)
	}
	zeros := 0
	for _, b := range sh[0].Y {
		if b == 0 {
			zeros++
		}
	}
	if zeros > 24 {
		t.Fatalf("share of a zero secret has %d zero bytes out of 1024", zeros)
	}
}

func TestCombineRejects(t *testing.T) {
	a, _ := Split([]byte("abc"), 3, 2)
	b, _ := Split([]byte("abcd"), 3, 3)
	if _, err := Combine([]Share{a[0], b[1]}); err == nil {
		t.Error("mixed splits combined")
	}
	if _, err := Combine([]Share{a[0], a[0]}); err == nil {
		t.Error("duplicate shares counted twice")
	}
	if _, err := Split(nil, 3, 2); err == nil {
		t.Error("empty secret split")
	}
	if _, err := Split([]byte("x"), 2, 3); err == nil {
		t.Error("k > n accepted")
	}
}

func TestMarshalParse(t *testing.T) {
	shares, _ := Split([]byte("secret key"), 3, 2)
	for _, s := range shares {
		p, err := Parse(s.Marshal())
		if err != nil || p.X != s.X || p.Threshold != s.Threshold || !bytes.Equal(p.Y, s.Y) {
			t.Fatalf("round trip: %v", err)
		}
	}
	for _, bad := range [][]byte{nil, []byte("ES1"), []byte("XX1\x01\x02\x00\x01a"), []byte("ES1\x00\x02\x00\x01a"), []byte("ES1\x01\x02\x00\x05a")} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("parsed %q", bad)
		}
	}
}

func FuzzParse(f *testing.F) {
	s, _ := Split([]byte("seed"), 2, 2)
	f.Add(s[0].Marshal())
	f.Fuzz(func(t *testing.T, b []byte) {
		sh, err := Parse(b)
		if err != nil {
			return
		}
		if !bytes.Equal(sh.Marshal(), b) {
			t.Fatal("parse/marshal not inverse")
		}
		Combine([]Share{sh})
	})
}

// Any k-1 shares are uniformly distributed whatever the secret, which holds
// only if the polynomial's coefficients are fresh and random: the same
// secret split many times must give k-1 share bytes that cover every value
// (tuple of values) evenly. A constant or reused coefficient makes each
// share of a fixed secret constant and fails the chi-square bound by far.
func TestCoefficientsAreRandom(t *testing.T) {
	tests := []struct {
		name   string
		k, n   int
		splits int // each split yields MaxSecret samples
	}{
		{"2-of-3: one share", 2, 3, 16},
		{"3-of-5: two shares", 3, 5, 64},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			secret := bytes.Repeat([]byte{0x42}, MaxSecret)
			cells := 1 << (8 * (tc.k - 1))
			counts := make([]int, cells)
			samples := 0
			for range tc.splits {
				shares, err := Split(secret, tc.n, tc.k)
				if err != nil {
					t.Fatal(err)
				}
				for b := range secret {
					cell := 0
					for _, s := range shares[:tc.k-1] {
						cell = cell<<8 | int(s.Y[b])
					}
					counts[cell]++
					samples++
				}
			}
			// Chi-square against the uniform distribution; the bound is the
			// mean plus 6 standard deviations (false alarm < 1e-8).
			expect := float64(samples) / float64(cells)
			chi := 0.0
			for _, c := range counts {
				d := float64(c) - expect
				chi += d * d / expect
			}
			df := float64(cells - 1)
			if bound := df + 6*math.Sqrt(2*df); chi > bound {
				t.Fatalf("k-1 shares of a fixed secret are not uniform: chi-square %.0f > %.0f (df %.0f)", chi, bound, df)
			}
		})
	}
}

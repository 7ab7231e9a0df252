package attest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dataembassy/embassy/keys/shamir"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/protocol/identity"
)

func TestRoundPeers(t *testing.T) {
	b := strings.Repeat("b", 32)
	c := strings.Repeat("c", 32)
	good := api.Peer{ID: b, Endpoints: []string{"10.0.2.2:9001", "10.0.3.2:9002"}}
	moved := api.Peer{ID: b, Endpoints: []string{"192.0.2.9:9001"}}
	rogue := api.Peer{ID: c, Endpoints: []string{"10.0.2.2:9999"}}
	bad := api.Peer{ID: "not-an-id", Endpoints: []string{"10.0.2.2:1"}}
	badEndpoint := api.Peer{ID: c, Endpoints: []string{"host.example:1"}}
	res := func(peers ...api.Peer) *Result { return &Result{Peers: peers} }
	cases := []struct {
		name    string
		results Round
		k       int
		want    string
	}{
		{"all agree", []*Result{res(good), res(good), res(good)}, 2, b},
		{"one broker adds a peer", []*Result{res(good, rogue), res(good), res(good)}, 2, b},
		{"endpoints differ", []*Result{res(good), res(moved), res(good)}, 2, b},
		{"no majority", []*Result{res(good), res(moved), res()}, 2, ""},
		{"listed twice by one broker", []*Result{res(rogue, rogue), res()}, 2, ""},
		{"malformed", []*Result{res(bad, badEndpoint), res(bad, badEndpoint)}, 2, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var ids []string
			for _, p := range tc.results.Peers(tc.k) {
				ids = append(ids, p.ID)
			}
			if got := strings.Join(ids, ","); got != tc.want {
				t.Fatalf("got %q, want %q (%s)", got, tc.want, fmt.Sprint(tc.results))
			}
		})
	}
}

func TestRoundDiskApprovals(t *testing.T) {
	res := func(n int) *Result { return &Result{DiskApprovals: n} }
	cases := []struct {
		name  string
		round Round
		want  int
	}{
		{"empty round", nil, 0},
		{"all agree", Round{res(2), res(2)}, 2},
		{"the smallest count wins", Round{res(3), res(1), res(2)}, 1},
		{"one broker approved nothing", Round{res(1), res(0)}, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.round.DiskApprovals(); got != tc.want {
				t.Fatalf("got %d, want %d", got, tc.want)
			}
		})
	}
}

func TestRoundKeys(t *testing.T) {
	secret := bytes.Repeat([]byte{7}, 32)
	shares, err := shamir.Split(secret, 3, 2)
	if err != nil {
		t.Fatal(err)
	}
	res := func(byDisk map[string]shamir.Share) *Result { return &Result{Shares: byDisk} }
	cases := []struct {
		name    string
		round   Round
		wantKey bool
		wantErr bool
	}{
		{"k shares", Round{res(map[string]shamir.Share{"d": shares[0]}), res(map[string]shamir.Share{"d": shares[2]})}, true, false},
		{"fewer than k shares", Round{res(map[string]shamir.Share{"d": shares[1]}), res(nil)}, false, true},
		{"no shares", Round{res(nil), res(nil)}, false, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			keys, err := tc.round.Keys(2)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err %v, want error %v", err, tc.wantErr)
			}
			k, ok := keys["d"]
			if ok != tc.wantKey || (ok && !bytes.Equal(k, secret)) {
				t.Fatalf("keys %x, want the secret: %v", keys, tc.wantKey)
			}
		})
	}
}

func TestWipeShares(t *testing.T) {
	shares, err := shamir.Split([]byte("a disk secret of 32 bytes......."), 3, 2)
	if err != nil {
		t.Fatal(err)
	}
	ys := [][]byte{shares[0].Y, shares[1].Y}
	r := Round{{Broker: "b1", Shares: map[string]shamir.Share{"d": shares[0]}}, {Broker: "b2", Shares: map[string]shamir.Share{"d": shares[1]}}}
	r.WipeShares()
	for i, y := range ys {
		if !bytes.Equal(y, make([]byte, len(y))) {
			t.Fatalf("share %d not overwritten: %x", i, y)
		}
	}
	if len(r[0].Shares)+len(r[1].Shares) != 0 {
		t.Fatal("wiped shares still listed")
	}
	if keys, _ := r.Keys(2); len(keys) != 0 {
		t.Fatal("keys recombined from wiped shares")
	}
}

func TestRoundReattestAfter(t *testing.T) {
	bounds := ReattestBounds{Min: 10 * time.Second, Max: 15 * time.Minute}
	res := func(d time.Duration) *Result { return &Result{ReattestAfter: d} }
	const tenYears = 10 * 365 * 24 * time.Hour
	cases := []struct {
		name  string
		round Round
		want  time.Duration
	}{
		{"empty round", nil, bounds.Max},
		{"all agree", Round{res(time.Minute), res(time.Minute)}, time.Minute},
		{"the smallest wins", Round{res(5 * time.Minute), res(time.Minute), res(2 * time.Minute)}, time.Minute},
		{"one broker answers ten years", Round{res(tenYears), res(5 * time.Minute)}, 5 * time.Minute},
		{"every broker answers ten years", Round{res(tenYears), res(tenYears)}, bounds.Max},
		{"one broker answers zero", Round{res(0), res(time.Minute)}, bounds.Min},
		{"one broker answers a negative interval", Round{res(-time.Hour), res(time.Minute)}, bounds.Min},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.round.ReattestAfter(bounds); got != tc.want {
				t.Fatalf("got %s, want %s", got, tc.want)
			}
		})
	}
}

func TestRoundCertificate(t *testing.T) {
	mk := func(key *ecdsa.PrivateKey, tag string, chainLen int, withLeaf bool) *tls.Certificate {
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: tag},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			t.Fatal(err)
		}
		c := &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
		for len(c.Certificate) < chainLen {
			c.Certificate = append(c.Certificate, []byte(tag))
		}
		if withLeaf {
			c.Leaf, _ = x509.ParseCertificate(der)
		}
		return c
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	otherKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	res := func(broker string, c *tls.Certificate) *Result { return &Result{Broker: broker, Certificate: c} }
	a, b, c := mk(key, "a", 2, true), mk(key, "b", 2, true), mk(key, "c", 2, false)
	cases := []struct {
		name  string
		round Round
		want  []*tls.Certificate // whose chains are presented, in order
	}{
		{"empty round", nil, nil},
		{"every broker's chain", Round{res("a", a), res("b", b), res("c", c)}, []*tls.Certificate{a, b, c}},
		{"a leaf without Leaf set first", Round{res("c", c), res("a", a)}, []*tls.Certificate{c, a}},
		{"one broker twice", Round{res("a", a), res("a", b), res("b", b)}, []*tls.Certificate{a, b}},
		{"failed and empty results", Round{nil, {Broker: "x", Err: ErrBadCertificate, Certificate: a}, res("y", nil), res("z", &tls.Certificate{}), res("b", b)},
			[]*tls.Certificate{b}},
		{"another key", Round{res("a", a), res("x", mk(otherKey, "x", 2, true)), res("b", b)}, []*tls.Certificate{a, b}},
		{"a chain past the cap", Round{res("a", a), res("x", mk(key, "x", identity.MaxPresented-1, true)), res("b", b)}, []*tls.Certificate{a, b}},
		{"a first chain past the cap", Round{res("x", mk(key, "x", identity.MaxPresented+1, true)), res("a", a)}, []*tls.Certificate{a}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := tc.round.Certificate()
			if tc.want == nil {
				if got != nil {
					t.Fatalf("got %d certificates, want none", len(got.Certificate))
				}
				return
			}
			var want [][]byte
			for _, c := range tc.want {
				want = append(want, c.Certificate...)
			}
			if got == nil || !slices.EqualFunc(got.Certificate, want, bytes.Equal) {
				n := 0
				if got != nil {
					n = len(got.Certificate)
				}
				t.Fatalf("presented %d certificates, want the %d of %d brokers' chains", n, len(want), len(tc.want))
			}
			if len(got.Certificate) > identity.MaxPresented {
				t.Fatalf("%d certificates presented, cap %d", len(got.Certificate), identity.MaxPresented)
			}
		})
	}
}

package attest

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/dataembassy/embassy/keys/shamir"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/protocol/identity"
)

// Round is one round of broker answers: the results AttestAll returned.
// What the appliance may do is decided over the round, never by a single
// broker: a disk key needs k shares, a peer k votes, a disk approval every
// answering broker's count.
type Round []*Result

// Keys recombines each disk's unlock secret from the round. A disk with
// fewer than k shares is left out and reported. The caller wipes the keys
// after use.
func (r Round) Keys(k int) (map[string][]byte, error) {
	byDisk := map[string][]shamir.Share{}
	for _, res := range r {
		for d, s := range res.Shares {
			byDisk[d] = append(byDisk[d], s)
		}
	}
	keys := map[string][]byte{}
	var errs []error
	for d, shares := range byDisk {
		if len(shares) < k {
			errs = append(errs, fmt.Errorf("disk %s: %d shares, %d needed", d, len(shares), k))
			continue
		}
		secret, err := shamir.Combine(shares)
		if err != nil {
			errs = append(errs, fmt.Errorf("disk %s: %w", d, err))
			continue
		}
		keys[d] = secret
	}
	return keys, errors.Join(errs...)
}

// WipeShares overwrites every share of the round and forgets them. Call it
// as soon as the keys are recombined (or, for a round that needs no keys,
// at once): plaintext shares must not outlive their use.
func (r Round) WipeShares() {
	for _, res := range r {
		if res == nil {
			continue
		}
		for d, s := range res.Shares {
			s.Wipe()
			delete(res.Shares, d)
		}
	}
}

// Peers returns the peers that at least k brokers list with the same
// endpoints, in a stable order: no single broker can add a peer. Peers
// whose entries are malformed are dropped.
func (r Round) Peers(k int) []api.Peer {
	votes := map[string]int{}
	byKey := map[string]api.Peer{}
	for _, res := range r {
		seen := map[string]bool{}
		for _, p := range res.Peers {
			if api.CheckApplianceID(p.ID) != nil || len(p.Endpoints) == 0 || len(p.Endpoints) > api.MaxEndpoints {
				continue
			}
			ok := true
			for _, e := range p.Endpoints {
				ok = ok && api.CheckEndpoint(e) == nil
			}
			key := p.ID + " " + strings.Join(p.Endpoints, ",")
			if !ok || seen[key] {
				continue
			}
			seen[key] = true
			votes[key]++
			byKey[key] = p
		}
	}
	var out []api.Peer
	for key, n := range votes {
		if n >= k {
			out = append(out, byKey[key])
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Certificate is what the appliance presents as a TLS server and client:
// the first broker's certificate for its key with that broker's chain,
// followed by every other broker's certificate for the same key and its
// chain. A peer believes the key only if k brokers' certificates are
// there (identity.Verifier); a client that checks the standard way sees
// the first broker's chain. Each broker's certificate was checked as it
// arrived (checkCertificate); here each broker adds at most one chain,
// only for the first one's key, and only while the whole stays within
// identity.MaxPresented: a chain that would pass it is left out, so that
// what one broker sent never makes a peer refuse the others'. Failed
// results and results without a certificate are skipped; nil if none has
// one.
func (r Round) Certificate() *tls.Certificate {
	var out *tls.Certificate
	brokers := map[string]bool{}
	for _, res := range r {
		if res == nil || res.Err != nil || res.Certificate == nil || len(res.Certificate.Certificate) == 0 || brokers[res.Broker] {
			continue
		}
		if out == nil {
			if len(res.Certificate.Certificate) > identity.MaxPresented {
				continue
			}
			c := *res.Certificate
			c.Certificate = slices.Clone(c.Certificate)
			out = &c
			brokers[res.Broker] = true
			continue
		}
		if len(out.Certificate)+len(res.Certificate.Certificate) > identity.MaxPresented || otherKey(out, res.Certificate) {
			continue
		}
		out.Certificate = append(out.Certificate, res.Certificate.Certificate...)
		brokers[res.Broker] = true
	}
	return out
}

// otherKey reports whether two certificates' leaves are known to carry
// different public keys. (Every result of AttestOnce carries its checked
// Leaf; a leaf that does not parse is not judged here.)
func otherKey(a, b *tls.Certificate) bool {
	ka, kb := leafKey(a), leafKey(b)
	return ka != nil && kb != nil && !bytes.Equal(ka, kb)
}

// leafKey is the PKIX public key of c's leaf, nil if it does not parse.
func leafKey(c *tls.Certificate) []byte {
	if c.Leaf != nil {
		return c.Leaf.RawSubjectPublicKeyInfo
	}
	leaf, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil {
		return nil
	}
	return leaf.RawSubjectPublicKeyInfo
}

// DiskApprovals is the number of disk approvals every broker of the round
// agrees on: the smallest count (0 for an empty round).
func (r Round) DiskApprovals() int {
	if len(r) == 0 {
		return 0
	}
	n := r[0].DiskApprovals
	for _, res := range r {
		n = min(n, res.DiskApprovals)
	}
	return n
}

// ReattestAfter is when the appliance re-attests after the round: the
// smallest of its brokers' intervals, each clamped to b, so that no single
// broker can delay re-attestation (and revocation) past b.Max or make it
// spin below b.Min. An empty round gives b.Max.
func (r Round) ReattestAfter(b ReattestBounds) time.Duration {
	d := b.Max
	for _, res := range r {
		d = min(d, b.Clamp(res.ReattestAfter))
	}
	return d
}

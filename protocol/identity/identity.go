// Package identity answers, for every party that meets an appliance over
// TLS (a twin replicating, a broker taking a share deposit, an operator
// checking an appliance), one question: which appliance does this
// certificate name, and did the brokers attest it? A party other than the
// issuing broker asks a Verifier, which believes a key only when k brokers,
// each through its own pinned CA, vouch for it; a broker taking back what
// it issued itself calls Verify with its own CA. Nothing else decides an
// appliance's identity from a certificate.
package identity

import (
	"bytes"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"time"
)

// DNSSuffix names attested appliances in their certificates:
// <appliance id>.appliance.embassy.
const DNSSuffix = ".appliance.embassy"

// Errors callers may branch on.
var (
	// ErrNoCertificate: the peer presented no certificate.
	ErrNoCertificate = errors.New("no certificate")
	// ErrNotAttested: the certificate does not chain to an attesting broker.
	ErrNotAttested = errors.New("certificate not issued by a broker")
	// ErrNoAppliance: the certificate names no appliance, or its common
	// name and its appliance name differ.
	ErrNoAppliance = errors.New("certificate names no appliance")
)

// DNSName is the certificate name of an appliance.
func DNSName(applianceID string) string { return applianceID + DNSSuffix }

// Verify checks a presented chain (leaf first, then intermediates) against
// one broker's roots (a broker checking the certificates it issued itself;
// every other party asks a Verifier, which needs k brokers), for the given key usage
// (client auth for a connecting peer, server auth for a dialled one), and
// returns the appliance id it was issued to. The leaf's common name must be
// that same id.
func Verify(chain []*x509.Certificate, roots *x509.CertPool, now time.Time, usage x509.ExtKeyUsage) (string, error) {
	if len(chain) == 0 {
		return "", ErrNoCertificate
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	return verifyLeaf(chain[0], roots, inter, now, usage)
}

// named returns the appliance id in the leaf's DNS names.
func named(c *x509.Certificate) (string, error) {
	var found string
	for _, n := range c.DNSNames {
		if id, ok := strings.CutSuffix(n, DNSSuffix); ok {
			if found != "" && found != id {
				return "", fmt.Errorf("%w: certificate names two appliances", ErrNoAppliance)
			}
			found = id
		}
	}
	if found == "" {
		return "", ErrNoAppliance
	}
	return found, nil
}

// MaxPresented bounds the certificates a party presents: one leaf and one
// intermediate from each of at most 16 brokers. A longer chain is refused
// whole (never read in part): an appliance presents at most one leaf and
// its intermediates per broker (attest.Round.Certificate), so a longer one
// comes from no appliance that follows the protocol.
const MaxPresented = 2 * 16

// ErrNotAgreed: fewer brokers than the threshold vouch for the presented
// key under any one appliance id. It wraps ErrNotAttested, so callers that
// only ask "attested?" see it as a no.
var ErrNotAgreed = fmt.Errorf("%w by enough brokers", ErrNotAttested)

// ErrTwoAppliances: the threshold of brokers vouches for the presented key
// under two different appliance ids. With a threshold above half the
// brokers it cannot happen unless a broker vouches twice; it is refused
// all the same. It wraps ErrNoAppliance.
var ErrTwoAppliances = fmt.Errorf("%w: the key is named as two appliances", ErrNoAppliance)

// Authority is one broker as a checking party pins it: its name and its
// own CA. No broker's CA vouches for another broker.
type Authority struct {
	Broker string
	Roots  *x509.CertPool
}

// Verifier decides an appliance's identity by agreement: the presented key
// counts only if at least Threshold distinct brokers, each through its own
// pinned CA, issued a certificate for that very key naming that same
// appliance. One broker's CA (stolen, or its admin gone rogue) can mint any
// certificate it likes; alone it is never believed, and what it adds to a
// genuine appliance's chain counts for nothing.
type Verifier struct {
	Brokers   []Authority
	Threshold int
}

// Attested is an identity that enough brokers agree on.
type Attested struct {
	ID string
	// Brokers are the brokers that vouched, in Verifier order.
	Brokers []string
}

// Verify checks a presented chain: the leaf (the key the TLS handshake
// proved) first, then any intermediates and the same key's certificates
// from other brokers with their intermediates, in any order. The vote is
// counted per appliance id: a broker vouches for id if some certificate
// for the leaf's key chains to that broker's CA for usage, is valid at now
// and names id (common name and DNS name). The id that at least Threshold
// brokers vouch for is the answer. A certificate that does not verify, is
// for another key or names another id counts for nothing, so one rogue or
// broken broker cannot spoil the others' agreement; a broker that vouches
// for the key under two ids counts for neither. Refused: an empty chain
// (ErrNoCertificate), one longer than MaxPresented, no id reaching the
// threshold (ErrNotAgreed), two ids reaching it (ErrTwoAppliances).
func (v Verifier) Verify(chain []*x509.Certificate, now time.Time, usage x509.ExtKeyUsage) (Attested, error) {
	if len(chain) == 0 {
		return Attested{}, ErrNoCertificate
	}
	if len(chain) > MaxPresented {
		return Attested{}, fmt.Errorf("%w: %d certificates presented, at most %d", ErrNotAttested, len(chain), MaxPresented)
	}
	if v.Threshold < 1 || v.Threshold > len(v.Brokers) {
		return Attested{}, fmt.Errorf("%w: threshold %d of %d brokers", ErrNotAttested, v.Threshold, len(v.Brokers))
	}
	leafKey := chain[0].RawSubjectPublicKeyInfo
	inter := x509.NewCertPool()
	var leaves []*x509.Certificate
	for _, c := range chain {
		switch {
		case c == nil:
		case c.IsCA:
			inter.AddCert(c)
		case bytes.Equal(c.RawSubjectPublicKeyInfo, leafKey):
			leaves = append(leaves, c)
		}
	}
	// vouchers lists, per appliance id, the brokers that vouch for the key
	// under it, in Verifier order.
	vouchers := map[string][]string{}
	var ids []string // in the order first vouched for
	var failures []string
	for _, a := range v.Brokers {
		names := map[string]bool{}
		var why error
		for _, c := range leaves {
			id, err := verifyLeaf(c, a.Roots, inter, now, usage)
			if err != nil {
				why = err
				continue
			}
			names[id] = true
		}
		switch len(names) {
		case 0:
			if why == nil {
				why = errors.New("no certificate")
			}
			failures = append(failures, a.Broker+": "+why.Error())
		case 1:
			for id := range names {
				if vouchers[id] == nil {
					ids = append(ids, id)
				}
				vouchers[id] = append(vouchers[id], a.Broker)
			}
		default:
			failures = append(failures, fmt.Sprintf("%s: names the key as %d appliances", a.Broker, len(names)))
		}
	}
	var got Attested
	best := 0
	for _, id := range ids {
		n := len(vouchers[id])
		best = max(best, n)
		if n < v.Threshold {
			if len(ids) > 1 {
				failures = append(failures, fmt.Sprintf("appliance %s: only %s", id, strings.Join(vouchers[id], ", ")))
			}
			continue
		}
		if got.ID != "" {
			return Attested{}, fmt.Errorf("%w: appliance %s (by %s) and %s (by %s)", ErrTwoAppliances,
				got.ID, strings.Join(got.Brokers, ", "), id, strings.Join(vouchers[id], ", "))
		}
		got = Attested{ID: id, Brokers: vouchers[id]}
	}
	if got.ID == "" {
		err := fmt.Errorf("%w: %d of %d brokers vouch for this key as one appliance, %d needed (%s)", ErrNotAgreed,
			best, len(v.Brokers), v.Threshold, strings.Join(failures, "; "))
		if best == 0 && len(leaves) == 1 {
			// A single certificate that names no appliance is that, not a
			// question of agreement.
			if _, nerr := named(chain[0]); nerr != nil {
				return Attested{}, nerr
			}
		}
		return Attested{}, err
	}
	return got, nil
}

// verifyLeaf checks one certificate against one broker's roots and
// returns the appliance it names.
func verifyLeaf(c *x509.Certificate, roots, inter *x509.CertPool, now time.Time, usage x509.ExtKeyUsage) (string, error) {
	opts := x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{usage}}
	if _, err := c.Verify(opts); err != nil {
		return "", fmt.Errorf("%w: %w", ErrNotAttested, err)
	}
	id, err := named(c)
	if err != nil {
		return "", err
	}
	if c.Subject.CommonName != id {
		return "", fmt.Errorf("%w: common name %q does not match appliance %s", ErrNoAppliance, c.Subject.CommonName, id)
	}
	return id, nil
}

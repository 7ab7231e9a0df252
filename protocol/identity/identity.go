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
// intermediate from each of at most 16 brokers.
const MaxPresented = 2 * 16

// ErrNotAgreed: fewer brokers than the threshold vouch for the presented
// key. It wraps ErrNotAttested, so callers that only ask "attested?" see
// it as a no.
var ErrNotAgreed = fmt.Errorf("%w by enough brokers", ErrNotAttested)

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
// certificate it likes; alone it is never believed.
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
// from other brokers with their intermediates, in any order. Each broker
// counts once, if some certificate for the leaf's key chains to that
// broker's CA for usage, is valid at now and names the appliance (common
// name and DNS name). Certificates naming a different appliance for the
// same key are refused outright.
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
		case c.IsCA:
			inter.AddCert(c)
		case bytes.Equal(c.RawSubjectPublicKeyInfo, leafKey):
			leaves = append(leaves, c)
		}
	}
	var got Attested
	var failures []string
	for _, a := range v.Brokers {
		vouched := false
		var why error
		for _, c := range leaves {
			id, err := verifyLeaf(c, a.Roots, inter, now, usage)
			if err != nil {
				why = err
				continue
			}
			if got.ID != "" && got.ID != id {
				return Attested{}, fmt.Errorf("%w: the key is named appliance %s and %s", ErrNoAppliance, got.ID, id)
			}
			got.ID, vouched = id, true
			break
		}
		if vouched {
			got.Brokers = append(got.Brokers, a.Broker)
		} else if why != nil {
			failures = append(failures, a.Broker+": "+why.Error())
		} else {
			failures = append(failures, a.Broker+": no certificate")
		}
	}
	if len(got.Brokers) < v.Threshold {
		err := fmt.Errorf("%w: %d of %d brokers vouch for this key, %d needed (%s)", ErrNotAgreed,
			len(got.Brokers), len(v.Brokers), v.Threshold, strings.Join(failures, "; "))
		if len(got.Brokers) == 0 && len(leaves) == 1 {
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

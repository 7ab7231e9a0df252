// Package identity answers, for every party that meets an appliance over
// TLS (a twin replicating, a broker taking a share deposit, an operator
// checking an appliance), one question: which appliance does this
// certificate name, and did the brokers attest it? Every such check calls
// Verify; nothing else decides an appliance's identity from a certificate.
package identity

import (
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
// the roots of the brokers that attest appliances, for the given key usage
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
	opts := x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{usage}}
	if _, err := chain[0].Verify(opts); err != nil {
		return "", fmt.Errorf("%w: %w", ErrNotAttested, err)
	}
	id, err := named(chain[0])
	if err != nil {
		return "", err
	}
	if chain[0].Subject.CommonName != id {
		return "", fmt.Errorf("%w: common name %q does not match appliance %s", ErrNoAppliance, chain[0].Subject.CommonName, id)
	}
	return id, nil
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

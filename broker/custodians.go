package broker

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"
)

// ErrNotCustodian is why a client certificate is refused at the operator
// API of a broker with its own custodians: this broker's custodian CA did
// not issue it, or it is revoked.
var ErrNotCustodian = errors.New("not a custodian of this broker")

// CustodianTLSConfig serves the operator API to this broker's own
// custodians only. The handshake requires a client certificate; every
// request is then admitted only if that certificate was issued by
// Config.Custodians for client authentication and is not revoked
// (Config.RevokedCustodians). Any other is refused with 401 and code
// unauthenticated (ReasonNotCustodian) before any route runs, so the
// client learns why, and the refusal is logged (MsgCustodianRefused, with
// the certificate's subject, issuer and fingerprint and the remote address)
// and counted. Refusals are not appended to the audit log, which anyone on
// the network could otherwise grow.
//
// So a custodian of another broker, whose certificate that broker's CA
// issued, can change nothing here. No ClientCAs are announced: a client
// whose certificate another CA issued sends it anyway (rather than none),
// so that the refusal can name it.
func (b *Broker) CustodianTLSConfig(cert tls.Certificate) *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAnyClientCert, MinVersion: tls.VersionTLS13}
}

// custodianRevocations is the revoked custodians' fingerprints, or why the
// list could not be read (then no custodian is admitted: fail closed).
type custodianRevocations struct {
	fingerprints map[string]bool
	err          error
}

// SetRevokedCustodians replaces the revoked custodians' SHA-256
// fingerprints (hex) while the broker serves: the next request of a
// revoked custodian is refused, without a restart. A non-nil readErr (the
// revocation list could not be read or parsed) refuses every custodian
// until a good list is set: a revocation that cannot be read must not
// quietly lapse.
func (b *Broker) SetRevokedCustodians(fingerprints map[string]bool, readErr error) {
	m := make(map[string]bool, len(fingerprints))
	for fp, ok := range fingerprints {
		if ok {
			m[strings.ToLower(fp)] = true
		}
	}
	b.revokedCustodians.Store(&custodianRevocations{fingerprints: m, err: readErr})
}

// admitCustodian checks a request's client certificate chain and logs and
// counts a refusal.
func (b *Broker) admitCustodian(remote string, chain []*x509.Certificate) error {
	err := b.verifyCustodian(chain)
	if err == nil {
		return nil
	}
	b.metrics.refusedOps.Inc()
	attrs := []any{"remote", remote, "error", err.Error()}
	if len(chain) > 0 {
		sum := sha256.Sum256(chain[0].Raw)
		attrs = append(attrs, "subject", chain[0].Subject.String(), "issuer", chain[0].Issuer.String(),
			"fingerprint", hex.EncodeToString(sum[:]))
	}
	b.cfg.Log.Warn(MsgCustodianRefused, attrs...)
	return err
}

// verifyCustodian checks that chain's leaf was issued by this broker's
// custodian CA for client authentication and is not revoked.
func (b *Broker) verifyCustodian(chain []*x509.Certificate) error {
	if b.cfg.Custodians == nil {
		return fmt.Errorf("%w: the broker has no custodian CA", ErrNotCustodian)
	}
	if len(chain) == 0 {
		return fmt.Errorf("%w: no client certificate", ErrNotCustodian)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	// Wall-clock time, as the TLS layer uses for every other certificate.
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: b.cfg.Custodians, Intermediates: inter,
		CurrentTime: time.Now(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return fmt.Errorf("%w: %w", ErrNotCustodian, err)
	}
	rev := b.revokedCustodians.Load() // set by New, replaced by SetRevokedCustodians
	if rev.err != nil {
		return fmt.Errorf("%w: the custodian revocation list cannot be read, so no custodian is admitted: %w", ErrNotCustodian, rev.err)
	}
	sum := sha256.Sum256(chain[0].Raw)
	if fp := hex.EncodeToString(sum[:]); rev.fingerprints[fp] {
		return fmt.Errorf("%w: custodian %s (sha256 %s) is revoked", ErrNotCustodian, chain[0].Subject, fp)
	}
	return nil
}

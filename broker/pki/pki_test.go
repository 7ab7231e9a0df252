package pki_test

import (
	"crypto/x509"
	"testing"
	"time"

	"github.com/dataembassy/embassy/broker/pki"
)

// TestLeafDERExpiry: the expiry LeafDER reports is the one encoded in the
// certificate, whether the validity or the issuer's own expiry bounds it.
func TestLeafDERExpiry(t *testing.T) {
	root, err := pki.NewRootCA("root", 2*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := root.NewIntermediate("service CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := pki.NewKey()
	for _, tc := range []struct {
		name     string
		validity time.Duration
	}{
		{"within the issuer's", 10*time.Minute + 123*time.Millisecond},
		{"capped by the issuer's", 3 * time.Hour},
	} {
		t.Run(tc.name, func(t *testing.T) {
			der, expires, err := svc.LeafDER("appliance", []string{"127.0.0.1", "a.example"}, &key.PublicKey, tc.validity)
			if err != nil {
				t.Fatal(err)
			}
			cert, err := x509.ParseCertificate(der)
			if err != nil {
				t.Fatal(err)
			}
			if !cert.NotAfter.Equal(expires) || cert.NotAfter.After(svc.Cert.NotAfter) {
				t.Fatalf("reported expiry %v, certificate's %v (issuer's %v)", expires, cert.NotAfter, svc.Cert.NotAfter)
			}
			if err := cert.CheckSignatureFrom(svc.Cert); err != nil {
				t.Fatal(err)
			}
		})
	}
}

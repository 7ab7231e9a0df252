package pki

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"math/big"
	"net"
	"testing"
	"time"
)

// sameAsX509 fails unless leafEd25519 and x509.CreateCertificate make the
// same certificate of spec, pub and svc (a service CA with an Ed25519
// key), byte for byte, or both refuse; a certificate made must parse and
// carry svc's valid signature.
func sameAsX509(t *testing.T, svc *Issuer, spec leafSpec, pub crypto.PublicKey) {
	t.Helper()
	key := svc.Key.(ed25519.PrivateKey)
	want, wantErr := x509.CreateCertificate(rand.Reader, spec.template(), svc.Cert, pub, key)
	got, gotErr := svc.leafEd25519(spec, pub, key)
	if (wantErr != nil) != (gotErr != nil) {
		t.Fatalf("x509 error %v, leafEd25519 error %v", wantErr, gotErr)
	}
	if wantErr != nil {
		return
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("leafEd25519 made a different certificate\n got %x\nwant %x", got, want)
	}
	cert, err := x509.ParseCertificate(got)
	if err != nil {
		t.Fatal(err)
	}
	if err := cert.CheckSignatureFrom(svc.Cert); err != nil {
		t.Fatal(err)
	}
}

func testServiceCA(t testing.TB) *Issuer {
	t.Helper()
	root, err := NewRootCA("root", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := root.NewIntermediate("broker-a service CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return svc
}

// TestLeafEd25519SameAsX509: the certificates the service CA issues
// without CreateCertificate are CreateCertificate's, for every kind of
// name and key an appliance may bring and validity the encoding tells
// apart.
func TestLeafEd25519SameAsX509(t *testing.T) {
	svc := testServiceCA(t)
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	edPub, _, _ := ed25519.GenerateKey(rand.Reader)
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	now := time.Now()
	base := leafSpec{serial: serial(), commonName: "a2e5b231dac4e90151454e2ebc76a6b1",
		notBefore: now.Add(-5 * time.Minute), notAfter: now.Add(time.Hour),
		dnsNames: []string{"a2e5b231dac4e90151454e2ebc76a6b1.appliance.embassy"}}
	with := func(f func(*leafSpec)) leafSpec {
		s := base
		f(&s)
		return s
	}
	for _, tc := range []struct {
		name string
		spec leafSpec
		pub  crypto.PublicKey
	}{
		{"appliance, P-256", base, &p256.PublicKey},
		{"P-384 key", base, &p384.PublicKey},
		{"Ed25519 key", base, edPub},
		{"RSA key", base, &rsaKey.PublicKey},
		{"unsupported key", base, struct{}{}},
		{"IPv4 and IPv6 addresses", with(func(s *leafSpec) {
			s.ipAddresses = []net.IP{net.ParseIP("10.0.0.7"), net.ParseIP("fe80::1"), net.IPv4(192, 168, 1, 1).To4()}
		}), &p256.PublicKey},
		{"addresses only", with(func(s *leafSpec) { s.dnsNames, s.ipAddresses = nil, []net.IP{net.ParseIP("127.0.0.1")} }), &p256.PublicKey},
		{"no names", with(func(s *leafSpec) { s.dnsNames = nil }), &p256.PublicKey},
		{"empty subject: critical names", with(func(s *leafSpec) { s.commonName = "" }), &p256.PublicKey},
		{"non-printable common name", with(func(s *leafSpec) { s.commonName = "appliance_€*" }), &p256.PublicKey},
		{"subject is the issuer's: no authority key id", with(func(s *leafSpec) { s.commonName = "broker-a service CA" }), &p256.PublicKey},
		{"non-ASCII DNS name refused", with(func(s *leafSpec) { s.dnsNames = []string{"bücher.example"} }), &p256.PublicKey},
		{"invalid UTF-8 DNS name refused", with(func(s *leafSpec) { s.dnsNames = []string{"a\xffb"} }), &p256.PublicKey},
		{"GeneralizedTime after 2049", with(func(s *leafSpec) { s.notAfter = time.Date(2051, 1, 2, 3, 4, 5, 6, time.UTC) }), &p256.PublicKey},
		{"UTCTime before 2050, another zone", with(func(s *leafSpec) {
			s.notAfter = time.Date(2049, 12, 31, 23, 59, 59, 999, time.FixedZone("X", 3600))
		}), &p256.PublicKey},
		{"serial zero", with(func(s *leafSpec) { s.serial = big.NewInt(0) }), &p256.PublicKey},
		{"negative serial refused", with(func(s *leafSpec) { s.serial = big.NewInt(-1) }), &p256.PublicKey},
	} {
		t.Run(tc.name, func(t *testing.T) { sameAsX509(t, svc, tc.spec, tc.pub) })
	}
}

// TestLeafDERUsesEd25519Path: LeafDER with an in-process Ed25519 key makes
// what CreateCertificate makes of its template (same serial and times),
// so the path the broker takes at every attestation is the one tested.
func TestLeafDERUsesEd25519Path(t *testing.T) {
	svc := testServiceCA(t)
	k, _ := NewKey()
	der, expires, err := svc.LeafDER("appliance", []string{"appliance.example", "10.1.2.3"}, &k.PublicKey, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	if !cert.NotAfter.Equal(expires) {
		t.Fatalf("expiry %v, certificate's %v", expires, cert.NotAfter)
	}
	spec := leafSpec{serial: cert.SerialNumber, commonName: "appliance", notBefore: cert.NotBefore, notAfter: cert.NotAfter,
		dnsNames: []string{"appliance.example"}, ipAddresses: []net.IP{net.ParseIP("10.1.2.3")}}
	want, err := x509.CreateCertificate(rand.Reader, spec.template(), svc.Cert, &k.PublicKey, svc.Key)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(der, want) {
		t.Fatal("LeafDER's certificate differs from CreateCertificate's")
	}
}

// FuzzLeafEd25519SameAsX509 holds leafEd25519 to CreateCertificate's
// output over arbitrary names, addresses, serials and validity.
func FuzzLeafEd25519SameAsX509(f *testing.F) {
	svc := testServiceCA(f)
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	edPub, _, _ := ed25519.GenerateKey(rand.Reader)
	f.Add("a2e5b231dac4e90151454e2ebc76a6b1", "a2e5b231dac4e90151454e2ebc76a6b1.appliance.embassy", []byte{10, 0, 0, 1}, []byte{1, 2, 3}, int64(1700000000), int64(3600), false)
	f.Add("", "", []byte(net.ParseIP("fe80::1")), []byte{0}, int64(-1), int64(1<<40), true)
	f.Add("broker-a service CA", "x", []byte{}, []byte{0xff, 0xff}, int64(2524608000), int64(0), false)
	f.Fuzz(func(t *testing.T, cn, dns string, ip, sn []byte, notBefore, life int64, edKey bool) {
		nb := time.Unix(notBefore%(1<<36), 0)
		spec := leafSpec{serial: new(big.Int).SetBytes(sn), commonName: cn, notBefore: nb, notAfter: nb.Add(time.Duration(life%(1<<40)) * time.Second)}
		if dns != "" {
			spec.dnsNames = []string{dns, dns + ".appliance.embassy"}
		}
		if len(ip) == net.IPv4len || len(ip) == net.IPv6len {
			spec.ipAddresses = []net.IP{ip}
		}
		var pub crypto.PublicKey = &p256.PublicKey
		if edKey {
			pub = edPub
		}
		sameAsX509(t, svc, spec, pub)
	})
}

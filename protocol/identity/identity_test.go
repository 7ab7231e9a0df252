package identity_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/dataembassy/embassy/protocol/identity"
)

// ca is a test certificate authority minted with crypto/x509 alone.
type ca struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// mint signs tmpl for pub with signer's key (tmpl itself and key when
// signer is nil: a self-signed root), valid for an hour.
func mint(t *testing.T, tmpl *x509.Certificate, signer *ca, pub, key any) *x509.Certificate {
	t.Helper()
	sn, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl.SerialNumber = sn
	tmpl.NotBefore = time.Now().Add(-time.Minute)
	tmpl.NotAfter = time.Now().Add(time.Hour)
	issuer := tmpl
	if signer != nil {
		issuer, key = signer.cert, signer.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer, pub, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func newCA(t *testing.T, name string, parent *ca) *ca {
	t.Helper()
	k := newKey(t)
	tmpl := &x509.Certificate{Subject: pkix.Name{CommonName: name}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	return &ca{cert: mint(t, tmpl, parent, &k.PublicKey, k), key: k}
}

func (c *ca) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c.cert)
	return p
}

// leaf issues an end-entity certificate with both client and server usage
// unless usages is given.
func (c *ca) leaf(t *testing.T, cn string, dns []string, usages ...x509.ExtKeyUsage) *x509.Certificate {
	t.Helper()
	if usages == nil {
		usages = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	}
	return mint(t, &x509.Certificate{Subject: pkix.Name{CommonName: cn}, DNSNames: dns, ExtKeyUsage: usages,
		KeyUsage: x509.KeyUsageDigitalSignature}, c, &newKey(t).PublicKey, nil)
}

func TestVerify(t *testing.T) {
	id := strings.Repeat("a", 32)
	other := strings.Repeat("b", 32)
	root := newCA(t, "broker root", nil)
	svc := newCA(t, "broker-a service CA", root)
	stranger := newCA(t, "someone else's root", nil)
	strangerSvc := newCA(t, "someone else's service CA", stranger)
	now := time.Now()

	good := svc.leaf(t, id, []string{identity.DNSName(id), "10.0.2.15"})
	tests := []struct {
		name  string
		chain []*x509.Certificate
		roots *x509.CertPool
		usage x509.ExtKeyUsage
		want  string
		err   error
	}{
		{"valid chain, client", []*x509.Certificate{good, svc.cert}, root.pool(), x509.ExtKeyUsageClientAuth, id, nil},
		{"valid chain, server", []*x509.Certificate{good, svc.cert}, root.pool(), x509.ExtKeyUsageServerAuth, id, nil},
		{"wrong root", []*x509.Certificate{strangerSvc.leaf(t, id, []string{identity.DNSName(id)}), strangerSvc.cert},
			root.pool(), x509.ExtKeyUsageClientAuth, "", identity.ErrNotAttested},
		{"our intermediate, other root", []*x509.Certificate{good, svc.cert}, stranger.pool(), x509.ExtKeyUsageClientAuth, "", identity.ErrNotAttested},
		{"missing intermediate", []*x509.Certificate{good}, root.pool(), x509.ExtKeyUsageClientAuth, "", identity.ErrNotAttested},
		{"server-only certificate used as client", []*x509.Certificate{
			svc.leaf(t, id, []string{identity.DNSName(id)}, x509.ExtKeyUsageServerAuth), svc.cert},
			root.pool(), x509.ExtKeyUsageClientAuth, "", identity.ErrNotAttested},
		{"client-only certificate used as server", []*x509.Certificate{
			svc.leaf(t, id, []string{identity.DNSName(id)}, x509.ExtKeyUsageClientAuth), svc.cert},
			root.pool(), x509.ExtKeyUsageServerAuth, "", identity.ErrNotAttested},
		{"client-only certificate used as client", []*x509.Certificate{
			svc.leaf(t, id, []string{identity.DNSName(id)}, x509.ExtKeyUsageClientAuth), svc.cert},
			root.pool(), x509.ExtKeyUsageClientAuth, id, nil},
		{"common name differs", []*x509.Certificate{svc.leaf(t, other, []string{identity.DNSName(id)}), svc.cert},
			root.pool(), x509.ExtKeyUsageClientAuth, "", identity.ErrNoAppliance},
		{"no appliance DNS name", []*x509.Certificate{svc.leaf(t, id, []string{"10.0.2.15", id + ".example.org"}), svc.cert},
			root.pool(), x509.ExtKeyUsageClientAuth, "", identity.ErrNoAppliance},
		{"two appliance names", []*x509.Certificate{svc.leaf(t, id, []string{identity.DNSName(id), identity.DNSName(other)}), svc.cert},
			root.pool(), x509.ExtKeyUsageClientAuth, "", identity.ErrNoAppliance},
		{"same appliance named twice", []*x509.Certificate{svc.leaf(t, id, []string{identity.DNSName(id), identity.DNSName(id)}), svc.cert},
			root.pool(), x509.ExtKeyUsageClientAuth, id, nil},
		{"empty chain", nil, root.pool(), x509.ExtKeyUsageClientAuth, "", identity.ErrNoCertificate},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := identity.Verify(tc.chain, tc.roots, now, tc.usage)
			if tc.err == nil && err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if tc.err != nil && !errors.Is(err, tc.err) {
				t.Fatalf("Verify error %v, want %v", err, tc.err)
			}
			if got != tc.want {
				t.Fatalf("Verify named %q, want %q", got, tc.want)
			}
		})
	}
}

func TestVerifyExpired(t *testing.T) {
	id := strings.Repeat("c", 32)
	root := newCA(t, "broker root", nil)
	svc := newCA(t, "service CA", root)
	chain := []*x509.Certificate{svc.leaf(t, id, []string{identity.DNSName(id)}), svc.cert}
	if _, err := identity.Verify(chain, root.pool(), time.Now().Add(2*time.Hour), x509.ExtKeyUsageClientAuth); !errors.Is(err, identity.ErrNotAttested) {
		t.Fatalf("expired certificate: %v", err)
	}
}

// TestVerifierNeedsKBrokers is the attack from a broker's side: each
// broker has its own root; one broker's CA (the test holds its key) mints
// whatever it likes. A key counts only when k brokers' own CAs vouch for
// it under the same appliance name.
func TestVerifierNeedsKBrokers(t *testing.T) {
	id := strings.Repeat("a", 32)
	other := strings.Repeat("b", 32)
	type broker struct{ root, svc *ca }
	var brokers []broker
	var auths []identity.Authority
	for _, n := range []string{"broker-a", "broker-b", "broker-c"} {
		root := newCA(t, n+" root", nil)
		brokers = append(brokers, broker{root, newCA(t, n+" service CA", root)})
		auths = append(auths, identity.Authority{Broker: n, Roots: root.pool()})
	}
	v := identity.Verifier{Brokers: auths, Threshold: 2}
	key := newKey(t)
	// issue returns broker i's certificate for key naming appliance name,
	// with its intermediate.
	issue := func(i int, k *ecdsa.PrivateKey, name string) []*x509.Certificate {
		c := mint(t, &x509.Certificate{Subject: pkix.Name{CommonName: name}, DNSNames: []string{identity.DNSName(name)},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
			KeyUsage:    x509.KeyUsageDigitalSignature}, brokers[i].svc, &k.PublicKey, nil)
		return []*x509.Certificate{c, brokers[i].svc.cert}
	}
	cat := func(parts ...[]*x509.Certificate) []*x509.Certificate {
		var out []*x509.Certificate
		for _, p := range parts {
			out = append(out, p...)
		}
		return out
	}
	// A rogue: broker-a's CA minted an intermediate of its own, and a leaf
	// under it for the appliance's name.
	rogueSvc := newCA(t, "broker-b service CA", brokers[0].root)
	rogueLeaf := mint(t, &x509.Certificate{Subject: pkix.Name{CommonName: id}, DNSNames: []string{identity.DNSName(id)},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature},
		rogueSvc, &key.PublicKey, nil)
	otherKey := newKey(t)
	tests := []struct {
		name    string
		chain   []*x509.Certificate
		want    []string
		err     error
		errText string
	}{
		{"a and b vouch", cat(issue(0, key, id), issue(1, key, id)), []string{"broker-a", "broker-b"}, nil, ""},
		{"all three, any order", cat(issue(2, key, id), issue(0, key, id), issue(1, key, id)), []string{"broker-a", "broker-b", "broker-c"}, nil, ""},
		{"one broker alone", issue(0, key, id), nil, identity.ErrNotAgreed, "1 of 3"},
		{"one broker's CA twice", cat(issue(0, key, id), issue(0, key, id)), nil, identity.ErrNotAgreed, "1 of 3"},
		{"rogue intermediate under a's root posing as b's", cat(issue(0, key, id), []*x509.Certificate{rogueLeaf, rogueSvc.cert}),
			nil, identity.ErrNotAgreed, "1 of 3"},
		{"b's certificate is for another key", cat(issue(0, key, id), issue(1, otherKey, id)), nil, identity.ErrNotAgreed, "broker-b"},
		{"b names another appliance for the key", cat(issue(0, key, id), issue(1, key, other)), nil, identity.ErrNotAgreed, "1 of 3"},
		{"b's intermediate missing", cat(issue(0, key, id), issue(1, key, id)[:1]), nil, identity.ErrNotAgreed, "broker-b"},
		{"empty", nil, nil, identity.ErrNoCertificate, ""},
		{"too many certificates", cat(issue(0, key, id), issue(1, key, id), make([]*x509.Certificate, identity.MaxPresented)),
			nil, identity.ErrNotAttested, "at most"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := v.Verify(tc.chain, time.Now(), x509.ExtKeyUsageServerAuth)
			if tc.err == nil {
				if err != nil {
					t.Fatalf("Verify: %v", err)
				}
				if got.ID != id || strings.Join(got.Brokers, ",") != strings.Join(tc.want, ",") {
					t.Fatalf("Verify = %+v, want %s vouched by %v", got, id, tc.want)
				}
				return
			}
			if !errors.Is(err, tc.err) || !strings.Contains(err.Error(), tc.errText) {
				t.Fatalf("Verify error %v, want %v containing %q", err, tc.err, tc.errText)
			}
			if !errors.Is(err, identity.ErrNotAttested) && !errors.Is(err, identity.ErrNoAppliance) && !errors.Is(err, identity.ErrNoCertificate) {
				t.Fatalf("error %v is none of the sentinel errors", err)
			}
		})
	}
	t.Run("threshold out of range", func(t *testing.T) {
		for _, k := range []int{0, 4} {
			bad := identity.Verifier{Brokers: auths, Threshold: k}
			if _, err := bad.Verify(cat(issue(0, key, id), issue(1, key, id)), time.Now(), x509.ExtKeyUsageServerAuth); !errors.Is(err, identity.ErrNotAttested) {
				t.Fatalf("threshold %d: %v", k, err)
			}
		}
	})
	t.Run("expired at one broker", func(t *testing.T) {
		if _, err := v.Verify(cat(issue(0, key, id), issue(1, key, id)), time.Now().Add(2*time.Hour), x509.ExtKeyUsageServerAuth); !errors.Is(err, identity.ErrNotAgreed) {
			t.Fatalf("expired: %v", err)
		}
	})
}

// TestVerifierOutvotesRogueBroker is the attack from one rogue (or broken)
// broker's side against a genuine appliance: brokers a and b issued honest
// certificates for the appliance's key; broker c, whose CA the rogue
// holds, adds whatever it likes to the chain. The appliance is still
// believed as itself, vouched by a and b only, and c alone never makes the
// key another appliance.
func TestVerifierOutvotesRogueBroker(t *testing.T) {
	id := strings.Repeat("a", 32)
	other := strings.Repeat("b", 32)
	type broker struct{ root, svc *ca }
	var brokers []broker
	var auths []identity.Authority
	for _, n := range []string{"broker-a", "broker-b", "broker-c", "broker-d"} {
		root := newCA(t, n+" root", nil)
		brokers = append(brokers, broker{root, newCA(t, n+" service CA", root)})
		auths = append(auths, identity.Authority{Broker: n, Roots: root.pool()})
	}
	key := newKey(t)
	issue := func(i int, k *ecdsa.PrivateKey, name string, notAfter time.Time) []*x509.Certificate {
		c := mint(t, &x509.Certificate{Subject: pkix.Name{CommonName: name}, DNSNames: []string{identity.DNSName(name)},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
			KeyUsage:    x509.KeyUsageDigitalSignature}, brokers[i].svc, &k.PublicKey, nil)
		if !notAfter.IsZero() {
			c = mintExpiring(t, c, brokers[i].svc, &k.PublicKey, notAfter)
		}
		return []*x509.Certificate{c, brokers[i].svc.cert}
	}
	cat := func(parts ...[]*x509.Certificate) []*x509.Certificate {
		var out []*x509.Certificate
		for _, p := range parts {
			out = append(out, p...)
		}
		return out
	}
	stranger := newCA(t, "a stranger's service CA", newCA(t, "a stranger's root", nil))
	padding := func(n int) []*x509.Certificate {
		out := make([]*x509.Certificate, n)
		for i := range out {
			out[i] = stranger.leaf(t, id, []string{identity.DNSName(id)})
		}
		return out
	}
	honest := cat(issue(0, key, id, time.Time{}), issue(1, key, id, time.Time{}))
	three := identity.Verifier{Brokers: auths[:3], Threshold: 2}
	tests := []struct {
		name  string
		v     identity.Verifier
		chain []*x509.Certificate
		want  []string // brokers that vouch for id; nil: refused with err
		err   error
	}{
		{"c names another appliance for the key", three, cat(honest, issue(2, key, other, time.Time{})), []string{"broker-a", "broker-b"}, nil},
		{"c names another appliance, its leaf first", three, cat(issue(2, key, other, time.Time{}), honest), []string{"broker-a", "broker-b"}, nil},
		{"c names both appliances", three, cat(honest, issue(2, key, other, time.Time{}), issue(2, key, id, time.Time{})), []string{"broker-a", "broker-b"}, nil},
		{"c's certificate is for another key", three, cat(honest, issue(2, newKey(t), id, time.Time{})), []string{"broker-a", "broker-b"}, nil},
		{"c's certificate is expired", three, cat(honest, issue(2, key, id, time.Now().Add(-time.Second))), []string{"broker-a", "broker-b"}, nil},
		{"c adds a stranger's certificates up to the cap", three, cat(honest, padding(identity.MaxPresented-len(honest))), []string{"broker-a", "broker-b"}, nil},
		{"c adds one certificate past the cap", three, cat(honest, padding(identity.MaxPresented-len(honest)+1)), nil, identity.ErrNotAttested},
		{"c's word alone for another appliance", three, cat(issue(0, key, id, time.Time{}), issue(2, key, other, time.Time{})), nil, identity.ErrNotAgreed},
		{"c's certificate twice for another appliance", three, cat(issue(2, key, other, time.Time{}), issue(2, key, other, time.Time{})), nil, identity.ErrNotAgreed},
		{"a vouching twice does not reach the threshold", three, cat(issue(0, key, id, time.Time{}), issue(2, key, other, time.Time{}), issue(0, key, other, time.Time{})), nil, identity.ErrNotAgreed},
		{"two appliances each reach 2 of 4", identity.Verifier{Brokers: auths, Threshold: 2},
			cat(honest, issue(2, key, other, time.Time{}), issue(3, key, other, time.Time{})), nil, identity.ErrTwoAppliances},
		{"3 of 4 outvote 1", identity.Verifier{Brokers: auths, Threshold: 3},
			cat(honest, issue(2, key, id, time.Time{}), issue(3, key, other, time.Time{})), []string{"broker-a", "broker-b", "broker-c"}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.v.Verify(tc.chain, time.Now(), x509.ExtKeyUsageServerAuth)
			if tc.want == nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("Verify = %+v, %v; want refused with %v", got, err, tc.err)
				}
				if got.ID != "" {
					t.Fatalf("refused, yet named %q", got.ID)
				}
				return
			}
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if got.ID != id || strings.Join(got.Brokers, ",") != strings.Join(tc.want, ",") {
				t.Fatalf("Verify = %+v, want %s vouched by %v", got, id, tc.want)
			}
		})
	}
	if !errors.Is(identity.ErrTwoAppliances, identity.ErrNoAppliance) {
		t.Fatal("ErrTwoAppliances does not wrap ErrNoAppliance")
	}
}

// mintExpiring reissues c's template from signer with NotAfter set.
func mintExpiring(t *testing.T, c *x509.Certificate, signer *ca, pub any, notAfter time.Time) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{Subject: c.Subject, DNSNames: c.DNSNames, ExtKeyUsage: c.ExtKeyUsage, KeyUsage: c.KeyUsage,
		SerialNumber: big.NewInt(1), NotBefore: notAfter.Add(-time.Hour), NotAfter: notAfter}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer.cert, pub, signer.key)
	if err != nil {
		t.Fatal(err)
	}
	out, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

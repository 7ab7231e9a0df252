package attest_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"log/slog"
	"math/big"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/appliance/attest/attesttest"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/protocol/identity"
)

// records is a slog handler that keeps every record's message and
// attributes, for tests that assert on the log.
type records struct {
	mu   sync.Mutex
	msgs []map[string]string
}

func (r *records) Enabled(context.Context, slog.Level) bool { return true }
func (r *records) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *records) WithGroup(string) slog.Handler            { return r }
func (r *records) Handle(_ context.Context, rec slog.Record) error {
	m := map[string]string{"msg": rec.Message}
	rec.Attrs(func(a slog.Attr) bool { m[a.Key] = a.Value.String(); return true })
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, m)
	return nil
}

// count is how many records have message msg and attribute key=value.
func (r *records) count(msg, key, value string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, m := range r.msgs {
		if m["msg"] == msg && m[key] == value {
			n++
		}
	}
	return n
}

// newClient starts the brokers and returns a broker client of them whose
// log the test reads.
func newClient(t *testing.T, k int, brokers ...*attesttest.Broker) (*attest.Client, *records) {
	t.Helper()
	cfg, pools := attesttest.Start(t, k, brokers...)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	logs := &records{}
	c, err := attest.New(cfg, pools, attesttest.NewTPM(t), key, func() ([]byte, error) { return []byte("event log"), nil }, slog.New(logs))
	if err != nil {
		t.Fatal(err)
	}
	return c, logs
}

// twinDial is what a twin (or embassyctl attest) sees of the appliance:
// it serves cert over real TLS, and the other side checks the handshake's
// chain with v as appliance/replicate does.
func twinDial(t *testing.T, cert *tls.Certificate, v identity.Verifier) (identity.Attested, error) {
	t.Helper()
	if cert == nil {
		return identity.Attested{}, errors.New("the appliance presents no certificate")
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{*cert}})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		conn.(*tls.Conn).Handshake()
	}()
	var got identity.Attested
	conn, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			var err error
			got, err = v.Verify(cs.PeerCertificates, time.Now(), x509.ExtKeyUsageServerAuth)
			return err
		}})
	if err != nil {
		return identity.Attested{}, err
	}
	conn.Close()
	return got, nil
}

// bigCertificate is a self-signed certificate of more than size bytes.
func bigCertificate(t *testing.T, size int) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "padding"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtraExtensions: []pkix.Extension{{Id: asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 99999, 1}, Value: make([]byte, size)}}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// TestRogueBrokerCannotSpoilIdentity is the attack from one rogue (or
// broken) broker's side: of three brokers with k = 2, broker-c answers
// every attestation with a certificate chain of its choosing. The
// appliance refuses that answer (logged as MsgCertificateRefused) and
// presents the honest brokers' certificates only, so a twin still
// believes it as itself, vouched by broker-a and broker-b.
func TestRogueBrokerCannotSpoilIdentity(t *testing.T) {
	other := strings.Repeat("f", 32)
	otherKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	var rogue *attesttest.Broker
	// issue is rogue's own certificate for the appliance's TLS key (or
	// pub) naming id (the appliance's when empty).
	issue := func(req *api.AttestRequest, pub any, id string) []byte {
		if pub == nil {
			p, err := x509.ParsePKIXPublicKey(req.TLSPublic)
			if err != nil {
				t.Error(err)
			}
			pub = p
		}
		if id == "" {
			id = req.ApplianceID
		}
		der, err := rogue.Issue(pub, id)
		if err != nil {
			t.Error(err)
		}
		return der
	}
	svc := func() []byte { return rogue.ServiceCA().Raw }
	big1, big2 := bigCertificate(t, 130<<10), bigCertificate(t, 130<<10)
	// The answers below are refused whole, except those whose own leaf
	// and chain are sound (kept): then only what follows them is dropped.
	cases := []struct {
		name   string
		kept   bool
		tamper func(honest [][]byte, req *api.AttestRequest) [][]byte
	}{
		{"garbage after the leaf", false, func(h [][]byte, req *api.AttestRequest) [][]byte {
			return [][]byte{h[0], []byte("garbage"), h[1]}
		}},
		{"garbage after the chain", false, func(h [][]byte, req *api.AttestRequest) [][]byte {
			return append(h, []byte("\x30\x03\x02\x01\x00"))
		}},
		{"garbage appended to the leaf", false, func(h [][]byte, req *api.AttestRequest) [][]byte {
			return [][]byte{append(slices.Clone(h[0]), "garbage"...), h[1]}
		}},
		{"a leaf for another key", false, func(h [][]byte, req *api.AttestRequest) [][]byte {
			return [][]byte{issue(req, &otherKey.PublicKey, ""), svc()}
		}},
		{"its leaf, then a leaf for another key", true, func(h [][]byte, req *api.AttestRequest) [][]byte {
			return [][]byte{h[0], h[1], issue(req, &otherKey.PublicKey, "")}
		}},
		{"a leaf naming another appliance", false, func(h [][]byte, req *api.AttestRequest) [][]byte {
			return [][]byte{issue(req, nil, other), svc()}
		}},
		{"its leaf, then a leaf naming another appliance", true, func(h [][]byte, req *api.AttestRequest) [][]byte {
			return [][]byte{h[0], h[1], issue(req, nil, other)}
		}},
		{"an oversized chain in bytes", false, func(h [][]byte, req *api.AttestRequest) [][]byte {
			return [][]byte{h[0], h[1], big1, big2}
		}},
		{"an oversized chain in count", false, func(h [][]byte, req *api.AttestRequest) [][]byte {
			out := slices.Clone(h)
			for len(out) <= identity.MaxPresented {
				out = append(out, h[1])
			}
			return out
		}},
		{"no chain at all", false, func(h [][]byte, req *api.AttestRequest) [][]byte { return nil }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rogue = &attesttest.Broker{Name: "broker-c", Tamper: tc.tamper}
			c, logs := newClient(t, 2, &attesttest.Broker{Name: "broker-a"}, &attesttest.Broker{Name: "broker-b"}, rogue)
			res, err := c.AttestAll(attesttest.Context(t, 1500*time.Millisecond), fastRetry, 2)
			if err != nil {
				t.Fatal(err)
			}
			cert := attest.Round(res).Certificate()
			got, err := twinDial(t, cert, c.Verifier())
			if err != nil {
				t.Fatalf("a twin refuses the genuine appliance: %v", err)
			}
			want, leaves := "broker-a,broker-b", 2
			if tc.kept {
				want, leaves = "broker-a,broker-b,broker-c", 3
			}
			if got.ID != c.ID() || strings.Join(got.Brokers, ",") != want {
				t.Fatalf("a twin believes %+v, want %s vouched by %s", got, c.ID(), want)
			}
			if n := logs.count(attest.MsgCertificateRefused, "broker", "broker-c"); (n == 0) != tc.kept {
				t.Fatalf("broker-c's certificate refused %d times (%q), want refused: %v", n, attest.MsgCertificateRefused, !tc.kept)
			}
			for _, b := range []string{"broker-a", "broker-b"} {
				if n := logs.count(attest.MsgCertificateRefused, "broker", b); n != 0 {
					t.Fatalf("honest %s's certificate refused %d times", b, n)
				}
			}
			// At most one leaf per broker, each for the appliance's key and
			// naming it, and nothing else the rogue sent.
			for _, der := range cert.Certificate {
				x, err := x509.ParseCertificate(der)
				if err != nil {
					t.Fatalf("the appliance presents an unparsable certificate: %v", err)
				}
				if x.IsCA {
					continue
				}
				leaves--
				if !bytes.Equal(x.RawSubjectPublicKeyInfo, c.TLSPublicKey()) || x.Subject.CommonName != c.ID() {
					t.Fatalf("the appliance presents a leaf for %s that is not its own", x.Subject)
				}
				if !tc.kept && bytes.Equal(x.RawIssuer, rogue.ServiceCA().RawSubject) {
					t.Fatalf("the appliance presents a certificate from broker-c: %s", x.Subject)
				}
			}
			if leaves != 0 {
				t.Fatalf("the appliance presents %d leaves too many", leaves)
			}
		})
	}

	t.Run("control: broker-c honest", func(t *testing.T) {
		c, logs := newClient(t, 2, &attesttest.Broker{Name: "broker-a"}, &attesttest.Broker{Name: "broker-b"}, &attesttest.Broker{Name: "broker-c"})
		res, err := c.AttestAll(attesttest.Context(t, 5*time.Second), fastRetry, 2)
		if err != nil {
			t.Fatal(err)
		}
		got, err := twinDial(t, attest.Round(res).Certificate(), c.Verifier())
		if err != nil || got.ID != c.ID() || len(got.Brokers) != 3 {
			t.Fatalf("honest brokers: %+v, %v", got, err)
		}
		if n := logs.count(attest.MsgCertificateRefused, "broker", "broker-c"); n != 0 {
			t.Fatalf("honest broker-c refused %d times", n)
		}
	})
}

// TestRogueBrokerRefusedCertificateError: the refusal of a broker's
// certificate is a failed attestation callers can tell (ErrBadCertificate)
// and no share of it is kept: with k = 2 of 2 and one rogue, the round
// fails below the threshold.
func TestRogueBrokerRefusedCertificateError(t *testing.T) {
	rogue := &attesttest.Broker{Name: "broker-b", Tamper: func(h [][]byte, _ *api.AttestRequest) [][]byte {
		return [][]byte{h[0], []byte("garbage")}
	}}
	c, _ := newClient(t, 2, &attesttest.Broker{Name: "broker-a"}, rogue)
	_, err := c.AttestAll(attesttest.Context(t, time.Second), fastRetry, 2)
	if !errors.Is(err, attest.ErrBelowThreshold) || !errors.Is(err, attest.ErrBadCertificate) {
		t.Fatalf("AttestAll: %v, want %v with %v", err, attest.ErrBelowThreshold, attest.ErrBadCertificate)
	}
}

// TestLateCertificatesJoin: at boot the appliance serves after the first
// k brokers; the slowest broker's certificate is added once it answers
// (Late.Certificate), so a twin that refuses one of the first k's
// certificates (here: it no longer trusts broker-a's CA) still counts k.
func TestLateCertificatesJoin(t *testing.T) {
	slow := &attesttest.Broker{Name: "broker-c", Delay: 300 * time.Millisecond}
	c, _ := newClient(t, 2, &attesttest.Broker{Name: "broker-a"}, &attesttest.Broker{Name: "broker-b"}, slow)
	first, late, err := c.AttestFirst(attesttest.Context(t, 5*time.Second), fastRetry, 2)
	if err != nil {
		t.Fatal(err)
	}
	if late.Certificate() != nil {
		t.Fatal("Late.Certificate before the round is over")
	}
	// A twin that distrusts broker-a: its pin for broker-a is a stranger's.
	v := c.Verifier()
	v.Brokers = slices.Clone(v.Brokers)
	v.Brokers[0].Roots = x509.NewCertPool()
	if got, err := twinDial(t, attest.Round(first).Certificate(), v); !errors.Is(err, identity.ErrNotAgreed) {
		t.Fatalf("the first k's certificate at a twin distrusting broker-a: %+v, %v; want %v", got, err, identity.ErrNotAgreed)
	}
	if err := late.Wait(); err != nil {
		t.Fatal(err)
	}
	got, err := twinDial(t, late.Certificate(), v)
	if err != nil || got.ID != c.ID() || strings.Join(got.Brokers, ",") != "broker-b,broker-c" {
		t.Fatalf("with the late certificate: %+v, %v; want %s vouched by broker-b and broker-c", got, err, c.ID())
	}
	if got, err := twinDial(t, late.Certificate(), c.Verifier()); err != nil || len(got.Brokers) != 3 {
		t.Fatalf("a twin trusting all: %+v, %v; want 3 brokers", got, err)
	}
}

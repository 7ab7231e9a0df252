// Package attesttest stands in for the home-state key brokers and the
// appliance's TPM in host tests of the broker client (appliance/attest)
// and of its callers: brokers served over real TLS on 127.0.0.1
// (httptest) whose answers a test chooses, as a compromised, slow or
// revoking broker would give them, and a TPM that quotes without keys.
// Nothing here releases shares: the brokers answer without any.
package attesttest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"io"
	stdlog "log"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	pb "github.com/google/go-tpm-tools/proto/tpm"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/appliance/config"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/protocol/identity"
)

// Broker is a fake broker. Set its fields before Start; they are read-only
// while it serves.
type Broker struct {
	Name string
	// ReattestAfter is the re-attestation interval it answers, in seconds
	// (any value, as a compromised broker may send).
	ReattestAfter int
	// Lockdown makes it refuse every attestation with a lockdown order
	// (403, code revoked), as for a revoked appliance.
	Lockdown bool
	// Delay holds back each attestation's answer.
	Delay time.Duration
	// Tamper, if set, replaces the certificate chain of each answer: it
	// gets the honest chain (the appliance's leaf, then the broker's
	// service CA) and the request, and returns what a rogue or broken
	// broker sends instead. Issue mints other certificates under the
	// broker's own CA.
	Tamper func(honest [][]byte, req *api.AttestRequest) [][]byte

	root, svc *ca
	srv       *httptest.Server
	answered  atomic.Int64
}

// ca is one of a fake broker's certificate authorities.
type ca struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

// newCA makes a CA under parent (self-signed when parent is nil).
func newCA(name string, parent *ca) (*ca, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{SerialNumber: serial(), Subject: pkix.Name{CommonName: name}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	issuer, signer := tmpl, key
	if parent != nil {
		issuer, signer = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer, &key.PublicKey, signer)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	return &ca{cert: cert, key: key}, err
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	return n
}

// Root is the broker's own root CA, the one an appliance pins for it.
func (b *Broker) Root() *x509.Certificate { return b.root.cert }

// ServiceCA is the intermediate under Root that issues the appliances'
// certificates.
func (b *Broker) ServiceCA() *x509.Certificate { return b.svc.cert }

// Answered is how many attestations the broker has answered.
func (b *Broker) Answered() int { return int(b.answered.Load()) }

func (b *Broker) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+api.PathNonce, func(w http.ResponseWriter, r *http.Request) {
		nonce := make([]byte, 32)
		rand.Read(nonce)
		writeJSON(w, http.StatusOK, api.NonceResponse{Nonce: nonce, Expires: time.Now().Add(time.Minute)})
	})
	mux.HandleFunc("POST "+api.PathAttest, b.attest)
	return mux
}

func (b *Broker) attest(w http.ResponseWriter, r *http.Request) {
	var req api.AttestRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, api.MaxBody)).Decode(&req); err != nil {
		writeJSON(w, http.StatusBadRequest, api.Error{Code: api.CodeBadRequest, Error: err.Error()})
		return
	}
	select {
	case <-time.After(b.Delay):
	case <-r.Context().Done():
		return
	}
	b.answered.Add(1)
	if b.Lockdown {
		writeJSON(w, http.StatusForbidden, api.Error{Code: api.CodeRevoked, Error: "appliance revoked", Lockdown: true})
		return
	}
	pub, err := x509.ParsePKIXPublicKey(req.TLSPublic)
	if err != nil {
		writeJSON(w, http.StatusBadRequest, api.Error{Code: api.CodeBadRequest, Error: err.Error()})
		return
	}
	cert, err := b.Issue(pub, req.ApplianceID)
	if err != nil {
		writeJSON(w, http.StatusInternalServerError, api.Error{Code: api.CodeBadRequest, Error: err.Error()})
		return
	}
	chain := [][]byte{cert, b.svc.cert.Raw}
	if b.Tamper != nil {
		chain = b.Tamper(chain, &req)
	}
	writeJSON(w, http.StatusOK, api.AttestResponse{ImageVersion: 1, Certificate: chain,
		CertExpires: time.Now().Add(time.Hour), ReattestAfter: b.ReattestAfter})
}

// Issue signs, with the broker's service CA, a certificate for pub naming
// appliance id as a broker does (common name and identity.DNSName, server
// and client authentication, an hour's validity).
func (b *Broker) Issue(pub crypto.PublicKey, id string) ([]byte, error) {
	tmpl := &x509.Certificate{SerialNumber: serial(), Subject: pkix.Name{CommonName: id},
		DNSNames: []string{identity.DNSName(id)}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		NotBefore:   time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}
	return x509.CreateCertificate(rand.Reader, tmpl, b.svc.cert, pub, b.svc.key)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// Start serves each broker over TLS on 127.0.0.1 until the test ends and
// returns an image config with k-of-n over them and, by broker name, the
// CA pool that trusts each: every broker has a root CA of its own, which
// issues its TLS server certificate and its service CA.
func Start(t testing.TB, k int, brokers ...*Broker) (*config.Config, map[string]*x509.CertPool) {
	t.Helper()
	cfg := &config.Config{Threshold: k, Ingest: config.Ingest{Addresses: []string{"127.0.0.1"}}}
	pools := map[string]*x509.CertPool{}
	for _, b := range brokers {
		var err error
		if b.root, err = newCA(b.Name+" root", nil); err != nil {
			t.Fatal(err)
		}
		if b.svc, err = newCA(b.Name+" service CA", b.root); err != nil {
			t.Fatal(err)
		}
		srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		srvDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: serial(),
			Subject: pkix.Name{CommonName: b.Name}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}, b.root.cert, &srvKey.PublicKey, b.root.key)
		if err != nil {
			t.Fatal(err)
		}
		b.srv = httptest.NewUnstartedServer(b.handler())
		b.srv.TLS = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{srvDER}, PrivateKey: srvKey}}}
		// Handshakes cut by a round's end are expected here.
		b.srv.Config.ErrorLog = stdlog.New(io.Discard, "", 0)
		b.srv.StartTLS()
		t.Cleanup(b.srv.Close)
		pools[b.Name] = x509.NewCertPool()
		pools[b.Name].AddCert(b.root.cert)
		cfg.Brokers = append(cfg.Brokers, config.Broker{Name: b.Name, Endpoints: []string{b.srv.URL}})
	}
	return cfg, pools
}

// NewClient starts the brokers (Start) and returns a broker client of
// them for a fake TPM.
func NewClient(t testing.TB, k int, brokers ...*Broker) *attest.Client {
	t.Helper()
	cfg, pool := Start(t, k, brokers...)
	tlsKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	c, err := attest.New(cfg, pool, NewTPM(t), tlsKey, func() ([]byte, error) { return []byte("event log"), nil },
		slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TPM is a fake TPM: a fresh EK public key, quotes that carry their extra
// data and nothing else, and no credential activation or import.
type TPM struct{ ek []byte }

// ErrFake is the fake TPM's answer to what it cannot do.
var ErrFake = errors.New("fake TPM: not supported")

// NewTPM makes a fake TPM with an EK of its own.
func NewTPM(t testing.TB) *TPM {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(k.Public())
	if err != nil {
		t.Fatal(err)
	}
	return &TPM{ek: der}
}

var _ attest.TPM = (*TPM)(nil)

// EKPublicDER returns the EK's PKIX DER.
func (f *TPM) EKPublicDER() ([]byte, error) { return f.ek, nil }

// EKCertDER returns no certificate.
func (f *TPM) EKCertDER() []byte { return nil }

// AKPublic returns a placeholder.
func (f *TPM) AKPublic() ([]byte, error) { return []byte("fake AK"), nil }

// Activate fails: the fake brokers never ask.
func (f *TPM) Activate(credBlob, encSecret []byte) ([]byte, error) { return nil, ErrFake }

// Quote returns a quote holding extraData only.
func (f *TPM) Quote(extraData []byte) (*pb.Quote, error) { return &pb.Quote{Quote: extraData}, nil }

// Import fails: the fake brokers release no share.
func (f *TPM) Import(blob *pb.ImportBlob) ([]byte, error) { return nil, ErrFake }

// Context returns a context that ends with the test or after d.
func Context(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

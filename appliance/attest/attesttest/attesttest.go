// Package attesttest stands in for the home-state key brokers and the
// appliance's TPM in host tests of the broker client (appliance/attest)
// and of its callers: brokers served over real TLS on 127.0.0.1
// (httptest) whose answers a test chooses, as a compromised, slow or
// revoking broker would give them, and a TPM that quotes without keys.
// Nothing here releases shares: the brokers answer without any.
package attesttest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"io"
	stdlog "log"
	"log/slog"
	"math/big"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	pb "github.com/google/go-tpm-tools/proto/tpm"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/appliance/config"
	"github.com/dataembassy/embassy/protocol/api"
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

	srv      *httptest.Server
	answered atomic.Int64
}

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
	cert, err := b.issue(req.TLSPublic)
	if err != nil {
		writeJSON(w, http.StatusBadRequest, api.Error{Code: api.CodeBadRequest, Error: err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, api.AttestResponse{ImageVersion: 1, Certificate: [][]byte{cert, b.srv.Certificate().Raw},
		CertExpires: time.Now().Add(time.Hour), ReattestAfter: b.ReattestAfter})
}

// issue signs a certificate for the appliance's TLS key with the key of
// the broker's own TLS certificate.
func (b *Broker) issue(tlsPublic []byte) ([]byte, error) {
	pub, err := x509.ParsePKIXPublicKey(tlsPublic)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: "appliance"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}
	return x509.CreateCertificate(rand.Reader, tmpl, b.srv.Certificate(), pub, b.srv.TLS.Certificates[0].PrivateKey)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// Start serves each broker over TLS on 127.0.0.1 until the test ends and
// returns an image config with k-of-n over them and, by broker name, the
// CA pool that trusts each.
func Start(t testing.TB, k int, brokers ...*Broker) (*config.Config, map[string]*x509.CertPool) {
	t.Helper()
	cfg := &config.Config{Threshold: k, Ingest: config.Ingest{Addresses: []string{"127.0.0.1"}}}
	pools := map[string]*x509.CertPool{}
	for _, b := range brokers {
		b.srv = httptest.NewUnstartedServer(b.handler())
		// Handshakes cut by a round's end are expected here.
		b.srv.Config.ErrorLog = stdlog.New(io.Discard, "", 0)
		b.srv.StartTLS()
		t.Cleanup(b.srv.Close)
		pools[b.Name] = x509.NewCertPool()
		pools[b.Name].AddCert(b.srv.Certificate())
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

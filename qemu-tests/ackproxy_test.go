package qemutests

import (
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dataembassy/embassy/broker/pki"
)

// ackProxy stands between restic and an appliance's ingest service and
// records every object upload the client was answered 200 for: the
// acknowledgements as the client saw them, not as the appliance logs them.
type ackProxy struct {
	mu    sync.Mutex
	acked map[string]bool // "repo/type/name"
	port  int
	ca    string // PEM of the proxy's own CA, for restic's --cacert
}

// startAckProxy forwards TLS connections on a fresh host port to the
// appliance's ingest forward at upstreamPort, presenting the client
// certificate of rc (the proxy acts for the client).
func startAckProxy(t testing.TB, upstreamPort int, rc *resticClient) *ackProxy {
	t.Helper()
	clientCert, err := tls.LoadX509KeyPair(rc.certFile, rc.certFile)
	if err != nil {
		t.Fatal(err)
	}
	target, _ := url.Parse(fmt.Sprintf("https://127.0.0.1:%d", upstreamPort))
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: rootPool(t), Certificates: []tls.Certificate{clientCert}},
		ResponseHeaderTimeout: 2 * time.Minute}
	rp.ErrorLog = log.New(io.Discard, "", 0)
	p := &ackProxy{acked: map[string]bool{}}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := &statusRecorder{ResponseWriter: w}
		rp.ServeHTTP(rec, r)
		// Objects only: repo/type/name and repo/config (not the
		// repository's creation, POST /repo/?create=true).
		obj := strings.Trim(r.URL.Path, "/")
		parts := strings.Split(obj, "/")
		isObject := len(parts) == 3 || (len(parts) == 2 && parts[1] == "config")
		if r.Method == http.MethodPost && rec.status == http.StatusOK && isObject {
			p.mu.Lock()
			p.acked[obj] = true
			p.mu.Unlock()
		}
	})
	ca, err := pki.NewRootCA("ack proxy CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := pki.NewKey()
	leaf, err := ca.Leaf("ack proxy", []string{"127.0.0.1"}, &key.PublicKey, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	p.ca = filepath.Join(t.TempDir(), "ack-proxy-ca.pem")
	if err := pki.WritePEM(p.ca, ca.Cert, "", nil); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.port = ln.Addr().(*net.TCPAddr).Port
	srv := &http.Server{Handler: handler, TLSConfig: &tls.Config{Certificates: []tls.Certificate{pki.TLSCertificate(leaf, key)}},
		ErrorLog: log.New(io.Discard, "", 0)}
	go srv.ServeTLS(ln, "", "")
	t.Cleanup(func() { srv.Close() })
	return p
}

// client is a restic client that goes through the proxy.
func (p *ackProxy) client(rc *resticClient) *resticClient {
	c := *rc
	c.url = fmt.Sprintf("rest:https://127.0.0.1:%d/population/", p.port)
	c.caFile = p.ca
	return &c
}

// acknowledged returns the objects the client got a 200 for so far.
func (p *ackProxy) acknowledged() map[string]bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[string]bool, len(p.acked))
	for k := range p.acked {
		out[k] = true
	}
	return out
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (s *statusRecorder) WriteHeader(code int) {
	if s.status == 0 {
		s.status = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

package replicate

import (
	"crypto/tls"
	"crypto/x509"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/dataembassy/embassy/appliance/objref"
	"github.com/dataembassy/embassy/protocol/api"
)

// FuzzServeRequest sends arbitrary methods, paths, queries and bodies as
// an attested peer: the server must answer without panicking, and what it
// stores must sit in a valid, replicated namespace and, for a
// content-addressed name, match its content.
func FuzzServeRequest(f *testing.F) {
	p := newPKI(f)
	n := newNode(f, p, strings.Repeat("a", 32), Options{AntiEntropyEvery: 1 << 62})
	peer := strings.Repeat("b", 32)
	n.rep.SetPeers([]api.Peer{{ID: peer, Endpoints: []string{"127.0.0.1:1"}}})
	cert := p.attested(f, peer)
	var chain []*x509.Certificate
	for _, der := range cert.Certificate {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			f.Fatal(err)
		}
		chain = append(chain, c)
	}
	f.Add("PUT", PathObject, "ns=reg/data&name=00", "x")
	f.Add("PUT", PathObject, "ns=reg/config&name=config", "cfg")
	f.Add("GET", PathList, "ns=reg/data", "")
	f.Add("PUT", PathObject, "ns=../../x&name=y", "z")
	f.Fuzz(func(t *testing.T, method, path, query, body string) {
		if !strings.HasPrefix(path, "/") || method == "" || strings.ContainsAny(method, " \r\n\t") {
			return
		}
		req := httptest.NewRequest("GET", "/", strings.NewReader(body))
		req.Method, req.URL.Path, req.URL.RawQuery = method, path, query
		req.TLS = &tls.ConnectionState{PeerCertificates: chain}
		rec := httptest.NewRecorder()
		n.srv.ServeHTTP(rec, req)
		nss, _ := n.store.Namespaces()
		for _, ns := range nss {
			if !Replicated(ns) {
				t.Fatalf("stored under namespace %q", ns)
			}
			objs, _ := n.store.List(ns)
			for _, o := range objs {
				data, err := n.store.Get(ns, o.Name)
				if err != nil || objref.CheckContent(o.Name, data) != nil {
					t.Fatalf("stored %s/%s that does not verify: %v", ns, o.Name, err)
				}
			}
		}
	})
}

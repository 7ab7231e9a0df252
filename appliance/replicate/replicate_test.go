package replicate

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/metricstest"
	"github.com/dataembassy/embassy/appliance/store"
	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/protocol/identity"
)

// testPKI is three brokers, each with its own root and service CA as
// keybroker init makes them; two must vouch for a peer.
type testPKI struct {
	roots, svcs []*pki.Issuer
}

func newPKI(t testing.TB) *testPKI {
	p := &testPKI{}
	for _, n := range []string{"broker-a", "broker-b", "broker-c"} {
		root, err := pki.NewRootCA(n+" root CA", time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		svc, err := root.NewIntermediate(n+" service CA", time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		p.roots, p.svcs = append(p.roots, root), append(p.svcs, svc)
	}
	return p
}

// ids is how an appliance of these brokers decides a peer: 2 of 3.
func (p *testPKI) ids() identity.Verifier {
	v := identity.Verifier{Threshold: 2}
	for i, r := range p.roots {
		v.Brokers = append(v.Brokers, identity.Authority{Broker: fmt.Sprintf("broker-%c", 'a'+i), Roots: r.Pool()})
	}
	return v
}

// attested is an appliance's certificate after attesting to every broker.
func (p *testPKI) attested(t testing.TB, id string) *tls.Certificate {
	return p.attestedBy(t, id, 0, 1, 2)
}

// attestedBy is a certificate for a fresh key from the given brokers
// only, each broker's leaf followed by its service CA.
func (p *testPKI) attestedBy(t testing.TB, id string, brokers ...int) *tls.Certificate {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	var c *tls.Certificate
	for _, i := range brokers {
		leaf, err := p.svcs[i].Leaf(id, []string{id + identity.DNSSuffix, "127.0.0.1"}, key.Public(), time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		if c == nil {
			tc := pki.TLSCertificate(leaf, key, p.svcs[i].Cert)
			c = &tc
			continue
		}
		c.Certificate = append(c.Certificate, leaf.Raw, p.svcs[i].Cert.Raw)
	}
	return c
}

// node is one appliance's store, replication server and replicator.
type node struct {
	id    string
	store *store.Store
	srv   *Server
	rep   *Replicator
	addr  string
	ln    net.Listener
	hs    *http.Server
	cert  atomic.Pointer[tls.Certificate]
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func newNode(t testing.TB, p *testPKI, id string, opts Options) *node {
	dir := t.TempDir()
	st, err := store.Open(quiet(), []store.DiskSpec{{ID: "d1", Root: filepath.Join(dir, "d1")}, {ID: "d2", Root: filepath.Join(dir, "d2")}})
	if err != nil {
		t.Fatal(err)
	}
	n := &node{id: id, store: st}
	n.cert.Store(p.attested(t, id))
	ctx, cancel := context.WithCancel(context.Background())
	n.rep = New(ctx, st, p.ids(), n.cert.Load, quiet(), opts)
	n.srv = (&Server{Store: st, IDs: p.ids(), Allowed: n.rep.IsPeer, Log: quiet()}).Init()
	n.ln, err = net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n.addr = n.ln.Addr().String()
	n.hs = &http.Server{Handler: n.srv, TLSConfig: &tls.Config{
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return n.cert.Load(), nil },
		ClientAuth:     tls.RequestClientCert,
	}}
	go n.hs.ServeTLS(n.ln, "", "")
	t.Cleanup(func() { cancel(); n.hs.Close() })
	return n
}

func put(t testing.TB, n *node, ns string, data []byte) string {
	sum := sha256.Sum256(data)
	name := hex.EncodeToString(sum[:])
	if _, err := n.store.Put(ns, name, data); err != nil {
		t.Fatal(err)
	}
	n.rep.Stored(ns, name, int64(len(data)))
	return name
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func waitFor(t testing.TB, what string, timeout time.Duration, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func pair(t testing.TB, opts Options) (*node, *node) {
	p := newPKI(t)
	a := newNode(t, p, strings.Repeat("a", 32), opts)
	b := newNode(t, p, strings.Repeat("b", 32), opts)
	a.rep.SetPeers([]api.Peer{{ID: b.id, Endpoints: []string{b.addr}}})
	b.rep.SetPeers([]api.Peer{{ID: a.id, Endpoints: []string{a.addr}}})
	return a, b
}

func sameObjects(t testing.TB, a, b *node, ns string) bool {
	la, err := a.store.List(ns)
	if err != nil {
		t.Fatal(err)
	}
	lb, err := b.store.List(ns)
	if err != nil {
		return false
	}
	return fmt.Sprint(la) == fmt.Sprint(lb)
}

func TestPushOnStore(t *testing.T) {
	a, b := pair(t, Options{AntiEntropyEvery: time.Hour})
	var names []string
	for i := 0; i < 20; i++ {
		names = append(names, put(t, a, "reg/data", randomBytes(10000+i)))
	}
	waitFor(t, "objects on b", 10*time.Second, func() bool { return sameObjects(t, a, b, "reg/data") })
	for _, n := range names {
		got, err := b.store.Get("reg/data", n)
		if err != nil {
			t.Fatal(err)
		}
		want, _ := a.store.Get("reg/data", n)
		if !bytes.Equal(got, want) {
			t.Fatalf("object %s differs", n)
		}
	}
	waitFor(t, "zero lag", 5*time.Second, func() bool { return a.rep.Lag()[0].PendingObjects == 0 })
	m := metricstest.Scrape(t, a.rep.Collectors()...)
	if !strings.Contains(m, fmt.Sprintf("embassy_replication_sent_objects_total{peer=%q} 20", b.id)) {
		t.Fatalf("metrics:\n%s", m)
	}
}

func TestAntiEntropyBothWays(t *testing.T) {
	p := newPKI(t)
	a := newNode(t, p, strings.Repeat("a", 32), Options{AntiEntropyEvery: time.Hour})
	b := newNode(t, p, strings.Repeat("b", 32), Options{AntiEntropyEvery: time.Hour})
	// Objects stored before the peers know each other: only anti-entropy
	// can find them. Locks are not replicated.
	onlyA := put(t, a, "reg/data", randomBytes(5000))
	onlyB := put(t, b, "reg/snapshots", randomBytes(300))
	put(t, a, "reg/locks", randomBytes(100))
	if _, err := a.store.Put("reg/config", "config", []byte("config of reg")); err != nil {
		t.Fatal(err)
	}
	a.rep.SetPeers([]api.Peer{{ID: b.id, Endpoints: []string{b.addr}}})
	b.rep.SetPeers([]api.Peer{{ID: a.id, Endpoints: []string{a.addr}}})
	waitFor(t, "anti-entropy", 10*time.Second, func() bool {
		_, ok1 := b.store.Has("reg/data", onlyA)
		_, ok2 := a.store.Has("reg/snapshots", onlyB)
		_, ok3 := b.store.Has("reg/config", "config")
		return ok1 && ok2 && ok3
	})
	if objs, _ := b.store.List("reg/locks"); len(objs) != 0 {
		t.Fatalf("locks replicated: %v", objs)
	}
}

func TestNamedConflictLeftAlone(t *testing.T) {
	p := newPKI(t)
	a := newNode(t, p, strings.Repeat("a", 32), Options{AntiEntropyEvery: time.Hour})
	b := newNode(t, p, strings.Repeat("b", 32), Options{AntiEntropyEvery: time.Hour})
	a.store.Put("reg/config", "config", []byte("one"))
	b.store.Put("reg/config", "config", []byte("two"))
	a.rep.SetPeers([]api.Peer{{ID: b.id, Endpoints: []string{b.addr}}})
	b.rep.SetPeers([]api.Peer{{ID: a.id, Endpoints: []string{a.addr}}})
	waitFor(t, "conflict counted", 10*time.Second, func() bool {
		m := metricstest.Scrape(t, a.rep.Collectors()...)
		return strings.Contains(m, fmt.Sprintf("embassy_replication_conflicts_total{peer=%q} 1", b.id))
	})
	got, _ := b.store.Get("reg/config", "config")
	if string(got) != "two" {
		t.Fatalf("b's config overwritten: %q", got)
	}
}

// TestRefusedPeers: only a certificate the brokers issued, naming a current
// peer, may list, read or write.
func TestRefusedPeers(t *testing.T) {
	p := newPKI(t)
	a := newNode(t, p, strings.Repeat("a", 32), Options{AntiEntropyEvery: time.Hour})
	b := strings.Repeat("b", 32)
	a.rep.SetPeers([]api.Peer{{ID: b, Endpoints: []string{"127.0.0.1:1"}}})
	secret := put(t, a, "reg/data", randomBytes(1000))

	selfSigned, _ := pki.NewRootCA(b, time.Hour)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	forgedLeaf, _ := selfSigned.Leaf(b, []string{b + identity.DNSSuffix}, key.Public(), time.Hour)
	forged := pki.TLSCertificate(forgedLeaf, key, selfSigned.Cert)
	other := newPKI(t)
	cases := []struct {
		name   string
		cert   *tls.Certificate
		status int
	}{
		{"no certificate", nil, http.StatusUnauthorized},
		{"self-signed with the peer's name", &forged, http.StatusUnauthorized},
		{"another CA", other.attested(t, b), http.StatusUnauthorized},
		{"one broker alone vouches", p.attestedBy(t, b, 1), http.StatusUnauthorized},
		{"two brokers vouch", p.attestedBy(t, b, 2, 0), http.StatusOK},
		{"attested but not a peer", p.attested(t, strings.Repeat("c", 32)), http.StatusForbidden},
		{"the peer", p.attested(t, b), http.StatusOK},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := &tls.Config{InsecureSkipVerify: true}
			if c.cert != nil {
				cfg.Certificates = []tls.Certificate{*c.cert}
			}
			cl := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}}
			for _, target := range []string{PathNamespaces, PathObject + "?ns=reg/data&name=" + secret} {
				resp, err := cl.Get("https://" + a.addr + target)
				if err != nil {
					t.Fatal(err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != c.status {
					t.Fatalf("%s: status %d, want %d (%s)", target, resp.StatusCode, c.status, body)
				}
				if c.status != http.StatusOK && bytes.Contains(body, []byte("reg/")) {
					t.Fatalf("refused client received data: %s", body)
				}
			}
			req, _ := http.NewRequest(http.MethodPut, "https://"+a.addr+PathObject+"?ns=reg/data&name="+hex.EncodeToString(make([]byte, 32)), bytes.NewReader(nil))
			resp, err := cl.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if c.status != http.StatusOK && resp.StatusCode != c.status {
				t.Fatalf("PUT status %d, want %d", resp.StatusCode, c.status)
			}
		})
	}
	refusals := 0
	for _, c := range cases {
		if c.status != http.StatusOK {
			refusals += 3 // two GETs and a PUT each
		}
	}
	m := metricstest.Scrape(t, a.srv.Collectors()...)
	if !strings.Contains(m, fmt.Sprintf("embassy_replication_refused_total %d\n", refusals)) {
		t.Fatalf("refusals not counted:\n%s", m)
	}
}

// TestReplicatorRefusesImpostorServer: a process at the peer's endpoint
// that is not the attested peer receives nothing.
func TestReplicatorRefusesImpostorServer(t *testing.T) {
	p := newPKI(t)
	a := newNode(t, p, strings.Repeat("a", 32), Options{AntiEntropyEvery: time.Hour})
	impostor := newNode(t, p, strings.Repeat("c", 32), Options{})
	impostor.rep.SetPeers([]api.Peer{{ID: a.id, Endpoints: []string{a.addr}}}) // it would accept a
	a.rep.SetPeers([]api.Peer{{ID: strings.Repeat("b", 32), Endpoints: []string{impostor.addr}}})
	put(t, a, "reg/data", randomBytes(1000))
	waitFor(t, "a failure", 10*time.Second, func() bool { return a.rep.Lag()[0].LastError != "" })
	if !strings.Contains(a.rep.Lag()[0].LastError, "not peer") {
		t.Fatalf("last error %q", a.rep.Lag()[0].LastError)
	}
	if nss, _ := impostor.store.Namespaces(); len(nss) != 0 {
		t.Fatalf("impostor received %v", nss)
	}
}

// blackHole accepts connections and never answers, like a path whose link
// went down under an established route.
func blackHole(t testing.TB) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		for _, c := range conns {
			c.Close()
		}
	})
	return ln.Addr().String()
}

// switchable forwards to a target while on; while off it accepts and
// stalls, like a link taken down.
type switchable struct {
	ln     net.Listener
	target string
	on     atomic.Bool
}

func newSwitchable(t testing.TB, target string) *switchable {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &switchable{ln: ln, target: target}
	s.on.Store(true)
	var used atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if !s.on.Load() {
				go func() { time.Sleep(time.Minute); c.Close() }()
				continue
			}
			used.Add(1)
			go func() {
				u, err := net.Dial("tcp", target)
				if err != nil {
					c.Close()
					return
				}
				done := make(chan struct{}, 2)
				go func() { io.Copy(u, c); done <- struct{}{} }()
				go func() { io.Copy(c, u); done <- struct{}{} }()
				// A switched-off link stalls established connections too.
				for {
					select {
					case <-done:
						c.Close()
						u.Close()
						return
					case <-time.After(50 * time.Millisecond):
						if !s.on.Load() {
							time.Sleep(time.Minute)
							c.Close()
							u.Close()
							return
						}
					}
				}
			}()
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return s
}

func TestPathFailover(t *testing.T) {
	p := newPKI(t)
	opts := Options{AntiEntropyEvery: time.Hour, ProbeEvery: 200 * time.Millisecond, DialTimeout: 500 * time.Millisecond}
	a := newNode(t, p, strings.Repeat("a", 32), opts)
	b := newNode(t, p, strings.Repeat("b", 32), opts)
	b.rep.SetPeers([]api.Peer{{ID: a.id, Endpoints: []string{a.addr}}})

	t.Run("dead first path", func(t *testing.T) {
		a.rep.SetPeers([]api.Peer{{ID: b.id, Endpoints: []string{blackHole(t), b.addr}}})
		n := put(t, a, "reg/data", randomBytes(2000))
		waitFor(t, "object over the second path", 10*time.Second, func() bool { _, ok := b.store.Has("reg/data", n); return ok })
	})
	t.Run("link down and up", func(t *testing.T) {
		first := newSwitchable(t, b.addr)
		second := newSwitchable(t, b.addr)
		a.rep.SetPeers(nil)
		a.rep.SetPeers([]api.Peer{{ID: b.id, Endpoints: []string{first.ln.Addr().String(), second.ln.Addr().String()}}})
		n1 := put(t, a, "reg/data", randomBytes(3000))
		waitFor(t, "object over the first path", 10*time.Second, func() bool { _, ok := b.store.Has("reg/data", n1); return ok })
		if a.rep.Lag()[0].Path != first.ln.Addr().String() {
			t.Fatalf("path in use %q", a.rep.Lag()[0].Path)
		}
		first.on.Store(false)
		n2 := put(t, a, "reg/data", randomBytes(3000))
		waitFor(t, "object over the second path", 10*time.Second, func() bool { _, ok := b.store.Has("reg/data", n2); return ok })
		first.on.Store(true)
		waitFor(t, "first path preferred again", 10*time.Second, func() bool { return a.rep.Lag()[0].Path == first.ln.Addr().String() })
		n3 := put(t, a, "reg/data", randomBytes(3000))
		waitFor(t, "object after recovery", 10*time.Second, func() bool { _, ok := b.store.Has("reg/data", n3); return ok })
	})
}

// TestBackPressure: with a tiny queue and a peer that is away, ingest never
// blocks, and anti-entropy delivers everything once the peer is back.
func TestBackPressure(t *testing.T) {
	p := newPKI(t)
	opts := Options{MaxPending: 3, AntiEntropyEvery: 300 * time.Millisecond, ProbeEvery: 100 * time.Millisecond, DialTimeout: 300 * time.Millisecond}
	a := newNode(t, p, strings.Repeat("a", 32), opts)
	b := newNode(t, p, strings.Repeat("b", 32), opts)
	sw := newSwitchable(t, b.addr)
	sw.on.Store(false)
	a.rep.SetPeers([]api.Peer{{ID: b.id, Endpoints: []string{sw.ln.Addr().String()}}})
	b.rep.SetPeers([]api.Peer{{ID: a.id}})
	start := time.Now()
	for i := 0; i < 50; i++ {
		put(t, a, "reg/data", randomBytes(1000+i))
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("ingest waited for the peer: %v", el)
	}
	if lag := a.rep.Lag()[0]; lag.PendingObjects > 3 {
		t.Fatalf("queue not bounded: %+v", lag)
	}
	sw.on.Store(true)
	waitFor(t, "catch-up", 20*time.Second, func() bool { return sameObjects(t, a, b, "reg/data") })
}

func TestServerRejectsBadObjects(t *testing.T) {
	p := newPKI(t)
	a := newNode(t, p, strings.Repeat("a", 32), Options{AntiEntropyEvery: time.Hour})
	b := strings.Repeat("b", 32)
	a.rep.SetPeers([]api.Peer{{ID: b, Endpoints: []string{"127.0.0.1:1"}}})
	cl := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{*p.attested(t, b)}}}}
	good := []byte("payload")
	sum := sha256.Sum256(good)
	cases := []struct {
		name, query string
		body        []byte
		status      int
	}{
		{"wrong hash", "ns=reg/data&name=" + hex.EncodeToString(make([]byte, 32)), good, http.StatusBadRequest},
		{"locks", "ns=reg/locks&name=" + hex.EncodeToString(sum[:]), good, http.StatusBadRequest},
		{"traversal", "ns=../x/data&name=" + hex.EncodeToString(sum[:]), good, http.StatusBadRequest},
		{"bad name", "ns=reg/data&name=../../etc", good, http.StatusBadRequest},
		{"good", "ns=reg/data&name=" + hex.EncodeToString(sum[:]), good, http.StatusOK},
	}
	for _, c := range cases {
		req, _ := http.NewRequest(http.MethodPut, "https://"+a.addr+PathObject+"?"+c.query, bytes.NewReader(c.body))
		resp, err := cl.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.status {
			t.Errorf("%s: status %d, want %d", c.name, resp.StatusCode, c.status)
		}
	}
	if nss, _ := a.store.Namespaces(); fmt.Sprint(nss) != "[reg/data]" {
		t.Fatalf("namespaces %v", nss)
	}
}

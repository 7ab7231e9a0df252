package broker_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/appliance/config"
	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/images/manifest"
	"github.com/dataembassy/embassy/operator/opclient"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/tpmtest"

	"github.com/google/go-tpm-tools/simulator"
)

// clock is a settable clock shared by the test brokers.
type clock struct {
	mu  sync.Mutex
	off time.Duration
}

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.off)
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	c.off += d
	c.mu.Unlock()
}

type runningBroker struct {
	name          string
	dir           string
	root          *pki.Issuer // the broker's own root CA, pinned in the image
	cfg           broker.Config
	b             *broker.Broker
	appLn, opLn   net.Listener
	appSrv, opSrv *http.Server
	serverCert    tls.Certificate
	auditKey      ed25519.PrivateKey // signs the broker's audit heads
	// forge, while set, rewrites the appliances of the broker's state
	// answer: a rogue broker's health reports (forge_test.go).
	forge atomic.Pointer[func(*api.Appliance)]
}

type env struct {
	t          testing.TB
	manu       *tpmtest.CA
	operatorCA *pki.Issuer
	opCert     tls.Certificate
	imageKey   ed25519.PrivateKey
	clock      *clock
	brokers    []*runningBroker
	cfg        *config.Config
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func newEnv(t testing.TB, n, k int) *env {
	t.Helper()
	e := &env{t: t, manu: tpmtest.NewCA(t, "Test TPM Manufacturer"), clock: &clock{}}
	var err error
	if e.operatorCA, err = pki.NewRootCA("home-state operator CA", 24*time.Hour); err != nil {
		t.Fatal(err)
	}
	opKey, _ := pki.NewKey()
	opLeaf, err := e.operatorCA.Leaf("operator alice", nil, &opKey.PublicKey, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	e.opCert = pki.TLSCertificate(opLeaf, opKey)
	_, e.imageKey, _ = ed25519.GenerateKey(rand.Reader)
	e.cfg = &config.Config{Threshold: k, Ingest: config.Ingest{Port: 8443,
		Repositories: map[string]config.Access{"population": {Writers: []string{"population-registry"}, QuotaBytes: 1 << 30}}}}
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("broker-%c", 'a'+i)
		rb := &runningBroker{name: name, dir: t.TempDir()}
		if rb.root, err = pki.NewRootCA(name+" root CA", 24*time.Hour); err != nil {
			t.Fatal(err)
		}
		svc, err := rb.root.NewIntermediate(name+" service CA", 24*time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		srvKey, _ := pki.NewKey()
		srvLeaf, err := rb.root.Leaf(name, []string{"127.0.0.1"}, &srvKey.PublicKey, 24*time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		rb.serverCert = pki.TLSCertificate(srvLeaf, srvKey)
		master := make([]byte, 32)
		rand.Read(master)
		_, rb.auditKey, _ = ed25519.GenerateKey(rand.Reader)
		rb.cfg = broker.Config{Name: name, Dir: rb.dir, MasterKey: master, ManufacturerCAs: e.manu.Pool(),
			ImageKey: e.imageKey.Public().(ed25519.PublicKey), ServiceCA: svc, AuditKey: rb.auditKey, Log: quiet(), Now: e.clock.now}
		rb.appLn, _ = net.Listen("tcp", "127.0.0.1:0")
		rb.opLn, _ = net.Listen("tcp", "127.0.0.1:0")
		e.brokers = append(e.brokers, rb)
		e.cfg.Brokers = append(e.cfg.Brokers, config.Broker{Name: name, Endpoints: []string{"https://" + rb.appLn.Addr().String()}})
		e.start(i)
	}
	if err := e.cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for i := range e.brokers {
			e.stop(i)
		}
	})
	return e
}

// start runs broker i on its listeners (re-listening on the same ports
// after a stop).
func (e *env) start(i int) {
	rb := e.brokers[i]
	var err error
	if rb.b, err = broker.New(rb.cfg); err != nil {
		e.t.Fatalf("start %s: %v", rb.name, err)
	}
	if rb.appLn == nil {
		// The same port again (the appliances' config names it). An
		// outgoing connection of the test may hold it as its local port
		// for a moment: retry briefly.
		addr := e.cfg.Brokers[i].Endpoints[0][len("https://"):]
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			if rb.appLn, err = net.Listen("tcp", addr); err == nil || time.Now().After(deadline) {
				break
			}
		}
		if err != nil {
			e.t.Fatal(err)
		}
		if rb.opLn, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			e.t.Fatal(err)
		}
	}
	rb.appSrv = &http.Server{Handler: rb.b.ApplianceHandler(), TLSConfig: rb.b.ApplianceTLSConfig(rb.serverCert), ErrorLog: nil}
	opTLS := broker.OperatorTLSConfig(rb.serverCert, e.operatorCA.Pool())
	if rb.cfg.Custodians != nil { // the broker's own custodians (custodians_test.go)
		opTLS = rb.b.CustodianTLSConfig(rb.serverCert)
	}
	rb.opSrv = &http.Server{Handler: rb.operatorHandler(), TLSConfig: opTLS, ErrorLog: log.New(io.Discard, "", 0)}
	go rb.appSrv.ServeTLS(rb.appLn, "", "")
	go rb.opSrv.ServeTLS(rb.opLn, "", "")
}

// stop shuts broker i down completely (its port refuses connections).
func (e *env) stop(i int) {
	rb := e.brokers[i]
	if rb.b == nil {
		return
	}
	rb.appSrv.Close()
	rb.opSrv.Close()
	rb.b.Close()
	rb.b, rb.appLn, rb.opLn = nil, nil, nil
}

// rootPool trusts every broker's root: for a test's own client that
// talks to any of them. The appliance pins each broker's alone
// (brokerCAs).
func (e *env) rootPool() *x509.CertPool {
	p := x509.NewCertPool()
	for _, rb := range e.brokers {
		p.AddCert(rb.root.Cert)
	}
	return p
}

// brokerCAs is what the image pins: each broker's own root, by name.
func (e *env) brokerCAs() map[string]*x509.CertPool {
	m := map[string]*x509.CertPool{}
	for _, rb := range e.brokers {
		m[rb.name] = rb.root.Pool()
	}
	return m
}

// op sends an operator request to broker i and returns the API error text.
func (e *env) op(i int, method, path string, body any, out any) error {
	return e.opAs(e.opCert, i, method, path, body, out)
}

// opAs sends an operator request to broker i with operator certificate
// cert.
func (e *env) opAs(cert tls.Certificate, i int, method, path string, body any, out any) error {
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.rootPool(), Certificates: []tls.Certificate{cert}}}}
	return do(hc, method, "https://"+e.brokers[i].opLn.Addr().String()+path, body, out)
}

// postJSON posts to broker i's appliance API.
func postJSON(e *env, i int, path string, in, out any) error {
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.rootPool()}}}
	return do(hc, http.MethodPost, e.cfg.Brokers[i].Endpoints[0]+path, in, out)
}

// do sends one JSON request and decodes the answer or the API error.
func do(hc *http.Client, method, url string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, url, rd)
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		var ae api.Error
		json.Unmarshal(data, &ae)
		return &apiError{body: ae}
	}
	if out != nil {
		return json.Unmarshal(data, out)
	}
	return nil
}

// apiError is a broker's error answer; its text is the answer's text.
type apiError struct{ body api.Error }

func (e *apiError) Error() string { return e.body.Error }

// codeOf returns the code of a broker's error answer ("" for none).
func codeOf(err error) api.Code {
	var ae *apiError
	if errors.As(err, &ae) {
		return ae.body.Code
	}
	return ""
}

func (e *env) opAll(method, path string, body any) {
	e.t.Helper()
	for i := range e.brokers {
		if err := e.op(i, method, path, body, nil); err != nil {
			e.t.Fatalf("%s %s on %s: %v", method, path, e.brokers[i].name, err)
		}
	}
}

// signManifest makes a signed manifest whose measurements are d.
func (e *env) signManifest(version uint64, d tpmtest.BootDigests, key ed25519.PrivateKey) ([]byte, []byte) {
	e.t.Helper()
	m := &manifest.Manifest{Schema: manifest.Schema, Version: version,
		Kernel:       manifest.KernelInfo{Package: "linux-image-test-amd64", Version: "1", DebSHA256: hex.EncodeToString(make([]byte, 32)), Release: "test"},
		Stub:         manifest.PackageInfo{Package: "systemd-boot-efi", Version: "1", DebSHA256: hex.EncodeToString(make([]byte, 32))},
		Measurements: d.Measurements()}
	for _, c := range []string{manifest.ComponentCmdline, manifest.ComponentInitramfs, manifest.ComponentKernel} {
		m.SetComponent(c, make([]byte, 32))
	}
	b, err := m.Marshal()
	if err != nil {
		e.t.Fatal(err)
	}
	return b, manifest.Sign(b, key)
}

func (e *env) approveImage(version uint64, d tpmtest.BootDigests) {
	e.t.Helper()
	m, s := e.signManifest(version, d, e.imageKey)
	e.opAll(http.MethodPost, api.PathManifests, api.ApproveManifestRequest{Manifest: m, Signature: s})
}

// lastAudit returns broker i's newest audit entry for an event.
func (e *env) lastAudit(i int, event string) audit.Entry {
	e.t.Helper()
	var ar audit.Response
	if err := e.op(i, http.MethodGet, api.PathAudit, nil, &ar); err != nil {
		e.t.Fatal(err)
	}
	for j := len(ar.Entries) - 1; j >= 0; j-- {
		if ar.Entries[j].Event == event {
			return ar.Entries[j]
		}
	}
	e.t.Fatalf("no %s entry in %s's audit log", event, e.brokers[i].name)
	return audit.Entry{}
}

// appliance is a simulated server: a TPM simulator with a measured boot.
type appliance struct {
	sim    *simulator.Simulator
	tpm    *attester.Attester
	log    []byte
	tlsKey *ecdsa.PrivateKey
	c      *attest.Client
	// cfg and brokerCAs are the image's: the brokers and their pinned CAs.
	cfg       *config.Config
	brokerCAs map[string]*x509.CertPool
}

// boot powers on the machine with TPM seed, measures image d and makes
// its broker client.
func (e *env) boot(seed int64, d tpmtest.BootDigests, ekType attester.EKType) *appliance {
	e.t.Helper()
	a := &appliance{sim: tpmtest.NewSimulator(e.t, e.manu, seed), cfg: e.cfg, brokerCAs: e.brokerCAs()}
	a.log = tpmtest.MeasuredBoot(e.t, a.sim, d)
	var err error
	if a.tpm, err = attester.Open(a.sim, ekType); err != nil {
		e.t.Fatal(err)
	}
	a.tlsKey, _ = pki.NewKey()
	a.c, err = attest.New(a.cfg, a.brokerCAs, a.tpm, a.tlsKey, func() ([]byte, error) { return a.log, nil }, quiet())
	if err != nil {
		e.t.Fatal(err)
	}
	return a
}

// reboot power-cycles the simulated machine (resetCount goes up) and
// measures image d again.
func (a *appliance) reboot(t testing.TB, d tpmtest.BootDigests) {
	t.Helper()
	a.tpm.Close()
	if err := a.sim.Reset(); err != nil {
		t.Fatal(err)
	}
	a.log = tpmtest.MeasuredBoot(t, a.sim, d)
	var err error
	if a.tpm, err = attester.Open(a.sim, attester.EKRSA); err != nil {
		t.Fatal(err)
	}
	// The broker client must use the new key handles.
	if a.c, err = attest.New(a.cfg, a.brokerCAs, a.tpm, a.tlsKey, func() ([]byte, error) { return a.log, nil }, quiet()); err != nil {
		t.Fatal(err)
	}
}

func (a *appliance) shutdown() {
	a.tpm.Close()
	if !a.sim.IsClosed() {
		a.sim.Close()
	}
}

// enroll runs enrollment and the operators' approval on every broker.
func (e *env) enroll(a *appliance) {
	e.t.Helper()
	if err := a.c.Enroll(context.Background()); err != nil {
		e.t.Fatal(err)
	}
	e.opAll(http.MethodPost, api.PathEnrollments+"/"+a.c.ID()+"/approve", struct{}{})
}

func ctxTimeout(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

var fastRetry = attest.Backoff{Initial: 50 * time.Millisecond, Max: 200 * time.Millisecond}

// operatorClient is an embassyctl client of every broker of e, with the
// test operator's credential.
func (e *env) operatorClient() *opclient.Client {
	var brokers []opclient.Broker
	for _, rb := range e.brokers {
		brokers = append(brokers, opclient.Broker{Name: rb.name, URL: "https://" + rb.opLn.Addr().String()})
	}
	return opclient.New(brokers, e.opCert, e.rootPool())
}

package qemutests

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/images/devpki"
	"github.com/dataembassy/embassy/images/imagekey"
	"github.com/dataembassy/embassy/operator/opclient"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/qemu-tests/vm"
)

// hostBrokers are the three key brokers of the local-default image config,
// run in the test process, each scenario's on host ports of their own
// (ports). The guest reaches them where the image config says
// (10.0.2.2:7441-7443 and 10.0.3.2:7441-7443) through QEMU guest forwards
// (guestForwards), so that scenarios can run side by side, each VM
// talking to its own scenario's brokers.
type hostBrokers struct {
	t    testing.TB
	b    []*broker.Broker
	srv  []*http.Server
	tlsc []*tls.Config
	// ports[i] is broker i's appliance port on 127.0.0.1, kept when it
	// stops so that it serves again where the VMs' forwards point.
	ports []int
	// custodians[i] is broker i's own custodian (custodianNames[i]), the
	// only kind of client its operator API admits.
	custodians []tls.Certificate
	// ops is an operator client of the brokers' operator APIs holding
	// each broker's custodian credential, as the demo's embassyctl does.
	ops    *opclient.Client
	opSrv  []*http.Server
	closed bool
	// deposits are the shares appliances deposited, by disk: what the
	// tests know to look for in memory dumps and bus recordings.
	depositsMu sync.Mutex
	deposits   map[string][][]byte
}

// recordDeposits keeps a copy of every share deposit that reaches a broker.
func (hb *hostBrokers) recordDeposits(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == api.PathDeposit && r.Method == http.MethodPost {
			body, err := io.ReadAll(io.LimitReader(r.Body, api.MaxBody))
			if err == nil {
				var req api.DepositRequest
				if json.Unmarshal(body, &req) == nil {
					hb.depositsMu.Lock()
					if hb.deposits == nil {
						hb.deposits = map[string][][]byte{}
					}
					hb.deposits[req.DiskID] = append(hb.deposits[req.DiskID], req.Share)
					hb.depositsMu.Unlock()
				}
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
		}
		h.ServeHTTP(w, r)
	})
}

// depositCount is the number of share deposits recorded since the brokers
// started.
func (hb *hostBrokers) depositCount() int {
	hb.depositsMu.Lock()
	defer hb.depositsMu.Unlock()
	n := 0
	for _, s := range hb.deposits {
		n += len(s)
	}
	return n
}

// brokerState is where the three brokers keep their state between runs:
// a database folder and a master key each. A provisioned embassy is kept
// as the brokers' state plus the appliances' TPMs, VARS and disks.
type brokerState struct {
	dirs    []string
	masters [][]byte
}

// freshBrokerState is empty state in the test's temp folders.
func freshBrokerState(t testing.TB) brokerState {
	var st brokerState
	for i := 0; i < 3; i++ {
		master := make([]byte, 32)
		rand.Read(master)
		st.dirs = append(st.dirs, t.TempDir())
		st.masters = append(st.masters, master)
	}
	return st
}

// close stops every broker and closes its database, so that its state
// can be copied. It is safe to call twice.
func (hb *hostBrokers) close() {
	if hb.closed {
		return
	}
	hb.closed = true
	for i := range hb.b {
		hb.stop(i)
		if hb.opSrv[i] != nil {
			hb.opSrv[i].Close()
		}
		hb.b[i].Close()
	}
}

// stop closes broker i's listener (its state stays).
func (hb *hostBrokers) stop(i int) {
	if hb.srv[i] != nil {
		hb.srv[i].Close()
		hb.srv[i] = nil
	}
}

// serve (re)starts broker i on its port (a free one the first time).
func (hb *hostBrokers) serve(i int) {
	hb.t.Helper()
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", hb.ports[i]))
	if err != nil {
		hb.t.Fatalf("broker port: %v", err)
	}
	hb.ports[i] = ln.Addr().(*net.TCPAddr).Port
	srv := &http.Server{Handler: hb.recordDeposits(hb.b[i].ApplianceHandler()), TLSConfig: hb.tlsc[i]}
	go srv.ServeTLS(ln, "", "")
	hb.srv[i] = srv
}

func startHostBrokers(t testing.TB) *hostBrokers {
	t.Helper()
	return startHostBrokersFrom(t, freshBrokerState(t))
}

// startHostBrokersFrom starts the three brokers on the given state.
func startHostBrokersFrom(t testing.TB, state brokerState) *hostBrokers {
	t.Helper()
	releaseSharedTwins() // they hold the brokers' ports
	hb := newHostBrokers(t, state)
	t.Cleanup(hb.close)
	return hb
}

// newHostBrokers starts the three brokers on the given state; the caller
// closes them.
func newHostBrokers(t testing.TB, state brokerState) *hostBrokers {
	t.Helper()
	// The manufacturer CA is swtpm's local CA; make sure it exists before
	// the first VM's swtpm_setup would create it.
	caDir := filepath.Join(cacheDir(), "swtpm-localca")
	tpmDir := filepath.Join(t.TempDir(), "tpm")
	os.MkdirAll(tpmDir, 0o700)
	if err := vm.SetupTPM(context.Background(), tpmDir, caDir); err != nil {
		t.Fatal(err)
	}
	manu := x509.NewCertPool()
	pems, _ := filepath.Glob(filepath.Join(caDir, "*.pem"))
	for _, p := range pems {
		if b, err := os.ReadFile(p); err == nil {
			manu.AppendCertsFromPEM(b)
		}
	}
	img, err := imagekey.LoadPublic(pubKeyPath())
	if err != nil {
		t.Fatal(err)
	}
	hb := &hostBrokers{t: t}
	var opBrokers []opclient.Broker
	var creds []opclient.Credential
	for i := 0; i < 3; i++ {
		name := brokerNames[i]
		root := brokerRoot(t, i)
		svc, err := root.NewIntermediate(name+" service CA", 24*time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		key, _ := pki.NewKey()
		leaf, err := root.Leaf(name, []string{"10.0.2.2", "10.0.3.2", "127.0.0.1"}, &key.PublicKey, 24*time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		custodians, custodian := brokerCustodian(t, i)
		hb.custodians = append(hb.custodians, custodian)
		b, err := broker.New(broker.Config{Name: name, Dir: state.dirs[i], MasterKey: state.masters[i], ManufacturerCAs: manu,
			ImageKey: img, ServiceCA: svc, ReattestAfter: 10 * time.Second, Custodians: custodians,
			Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			t.Fatal(err)
		}
		hb.b = append(hb.b, b)
		hb.srv = append(hb.srv, nil)
		hb.ports = append(hb.ports, 0)
		hb.tlsc = append(hb.tlsc, b.ApplianceTLSConfig(pki.TLSCertificate(leaf, key)))
		hb.serve(i)
		opLn, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("operator port: %v", err)
		}
		opSrv := &http.Server{Handler: b.OperatorHandler(), TLSConfig: b.CustodianTLSConfig(pki.TLSCertificate(leaf, key))}
		go opSrv.ServeTLS(opLn, "", "")
		hb.opSrv = append(hb.opSrv, opSrv)
		opBrokers = append(opBrokers, opclient.Broker{Name: name, URL: "https://" + opLn.Addr().String()})
		creds = append(creds, opclient.Credential{Cert: hb.custodians[i], Roots: root.Pool()})
	}
	if hb.ops, err = opclient.NewPerBroker(opBrokers, creds); err != nil {
		t.Fatal(err)
	}
	scenarioBrokers.Store(rootTestName(t), hb)
	return hb
}

// brokerGuestPort is broker i's port in the image config (every broker
// address there is <NIC's x.x.x.2>:brokerGuestPort(i)).
func brokerGuestPort(i int) int { return 7441 + i }

// harnessHostAlias is where the harness's guests reach the host's
// loopback (peers' service forwards, the impostors) on each NIC's
// network; x.x.x.2, QEMU's usual host alias, is the brokers' address in
// the image config and is forwarded to the scenario's own brokers.
const harnessHostAlias = 254

// hostAlias is the host's address on NIC nic's network, as the harness's
// guests see it.
func hostAlias(nic int) string { return fmt.Sprintf("10.0.%d.%d", 2+nic, harnessHostAlias) }

// scenarioBrokers are the brokers each scenario started last, by
// top-level test name: the ones its VMs reach (harnessNetwork).
var scenarioBrokers sync.Map

// rootTestName is the top-level test of t (a subtest's parent).
func rootTestName(t testing.TB) string {
	name, _, _ := strings.Cut(t.Name(), "/")
	return name
}

// guestForwards point each NIC's broker addresses of the image config at
// these brokers' ports, through one guestfwd process per connection.
func (hb *hostBrokers) guestForwards() []vm.GuestForward {
	var fwds []vm.GuestForward
	for nic := 0; nic < 2; nic++ {
		for i, port := range hb.ports {
			fwds = append(fwds, vm.GuestForward{NIC: nic,
				GuestAddr: fmt.Sprintf("10.0.%d.2:%d", 2+nic, brokerGuestPort(i)),
				Command:   fmt.Sprintf("%s 127.0.0.1:%d", guestfwdBin, port)})
		}
	}
	return fwds
}

// harnessNetwork gives cfg the harness's network: the host alias moved to
// x.x.x.254, and the image config's broker addresses forwarded to the
// scenario's brokers unless cfg names forwards of its own. With no
// brokers started those addresses stay unreachable.
func harnessNetwork(t testing.TB, cfg *vm.Config) {
	cfg.HostAlias = harnessHostAlias
	if cfg.GuestForwards != nil {
		return
	}
	if hb, ok := scenarioBrokers.Load(rootTestName(t)); ok {
		cfg.GuestForwards = hb.(*hostBrokers).guestForwards()
	}
}

// custodianNames are the brokers' custodians in the tests: custodianNames[i]
// is broker i's, and holds a credential for broker i only.
var custodianNames = []string{"alice@broker-a", "bob@broker-b", "carol@broker-c"}

// brokerCustodian is broker i's own custodian CA and its custodian, as
// `keybroker init --custodian` makes them, kept with the other local-default
// PKI in the cache (<broker>-custodian-ca.pem/.key, <broker>-custodian.pem/.key)
// so that their fingerprints stay the same from run to run.
func brokerCustodian(t testing.TB, i int) (*x509.CertPool, tls.Certificate) {
	t.Helper()
	dir := filepath.Join(cacheDir(), "pki")
	ca, err := devpki.Ensure(dir, brokerNames[i]+"-custodian-ca", "embassy local "+brokerNames[i]+" custodian CA")
	if err != nil {
		t.Fatalf("%s custodian CA: %v", brokerNames[i], err)
	}
	certPath, keyPath, err := devpki.EnsureLeaf(dir, brokerNames[i]+"-custodian", custodianNames[i], ca)
	if err != nil {
		t.Fatalf("%s custodian: %v", brokerNames[i], err)
	}
	pool, err := pki.LoadPool(ca.CertPath)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		t.Fatalf("%s custodian: %v", brokerNames[i], err)
	}
	return pool, cert
}

// op is the custodian that in-process changes at broker b are audited as:
// b's own (the one ops shows b).
func (hb *hostBrokers) op(b *broker.Broker) audit.Actor {
	hb.t.Helper()
	for i, bi := range hb.b {
		if bi == b {
			leaf, err := x509.ParseCertificate(hb.custodians[i].Certificate[0])
			if err != nil {
				hb.t.Fatal(err)
			}
			return audit.OperatorActor(leaf)
		}
	}
	hb.t.Fatalf("broker %s is not one of the host brokers", b.Name())
	return audit.Actor{}
}

package qemutests

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/protocol/identity"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
	"github.com/dataembassy/embassy/qemu-tests/vm"
)

// recordingImpostor is a host process that answers TLS with a certificate
// of its choosing and counts what reaches it: handshakes begun, and HTTP
// requests that got past the handshake.
type recordingImpostor struct {
	hellos, requests atomic.Int64
}

func (im *recordingImpostor) listen(t testing.TB, addr string, cert tls.Certificate) {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("impostor at %s: %v", addr, err)
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			im.requests.Add(1)
			io.Copy(io.Discard, io.LimitReader(r.Body, 64<<20))
			w.Write([]byte("{}"))
		}),
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequestClientCert,
			GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
				im.hellos.Add(1)
				return nil, nil
			}},
		ErrorLog: log.New(io.Discard, "", 0),
	}
	go srv.ServeTLS(ln, "", "")
	t.Cleanup(func() { srv.Close() })
}

// TestRogueBrokerCannotImpersonate: a host process holds broker-a's root
// CA key (stolen, or broker-a's admin gone rogue) and mints what it likes
// with it. It stands in for broker-b at broker-b's address, and for twin-b
// at both of twin-b's endpoints, with certificates for those names from
// broker-a's CA (for the peer also a "broker-b service CA" of its own
// making). Twin-a boots with an approved blank disk: it attests to
// broker-a and broker-c (k=2) and serves its data, but the impostor
// broker gets handshakes and not one request, so no nonce, attestation or
// share deposit; the blank disk, which needs every broker's share, is not
// used, and no real broker received a deposit either. A backup into A is
// stored, and the impostor peer gets handshakes and not one replication
// request.
func TestRogueBrokerCannotImpersonate(t *testing.T) {
	parallelScenario(t, 1, 60*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	hb, dir := copyEmbassy(t)
	a := restTwin(t, hb, dir, twinNames[0])
	b := restTwin(t, hb, dir, twinNames[1]) // never started: its endpoints are the impostor's
	a.cfg.Name = "rogue-a"

	// A blank disk for A, approved at the two real brokers.
	blank := filepath.Join(dir, "blank.img")
	f, err := os.Create(blank)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(fixtureDiskSize)
	f.Close()
	a.cfg.Disks = append(a.cfg.Disks, blank)
	for _, i := range []int{0, 2} {
		if err := hb.b[i].ApproveDisks(hb.op(hb.b[i]), a.id, 1); err != nil {
			t.Fatal(err)
		}
	}
	depositsBefore := hb.depositCount()

	stolen := brokerRoot(t, 0)
	// The impostor broker at broker-b's address.
	hb.stop(1)
	bKey, _ := pki.NewKey()
	bLeaf, err := stolen.Leaf("broker-b", []string{"10.0.2.2", "10.0.3.2", "127.0.0.1"}, &bKey.PublicKey, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	var rogueBroker recordingImpostor
	rogueBroker.listen(t, fmt.Sprintf("127.0.0.1:%d", hb.ports[1]), pki.TLSCertificate(bLeaf, bKey))

	// The impostor peer at twin-b's endpoints: a certificate for B's id
	// as broker-a, and one under a "broker-b service CA" that broker-a's
	// root signed.
	pKey, _ := pki.NewKey()
	names := []string{identity.DNSName(b.id), "127.0.0.1"}
	asA, err := stolen.Leaf(b.id, names, &pKey.PublicKey, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	fakeB, err := stolen.NewIntermediate("broker-b service CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	asB, err := fakeB.Leaf(b.id, names, &pKey.PublicKey, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	var roguePeer recordingImpostor
	for _, p := range b.ports {
		roguePeer.listen(t, fmt.Sprintf("127.0.0.1:%d", p), pki.TLSCertificate(asA, pKey, asB, fakeB.Cert))
	}

	a.v = startVM(t, a.cfg)
	waitMsg(t, ctx, a.v, 0, logmsg.MsgServing)
	waitPeer(t, ctx, a, b.id)
	lines := a.v.Lines()
	if !consoleHasMsg(lines, "provisioning needs all brokers") {
		t.Fatal("A did not report that the blank disk needs every broker")
	}
	for _, l := range lines {
		if bootreport.JSONMsg(l.Text) == "disk provisioned, shares deposited" {
			t.Fatalf("a disk was provisioned without broker-b: %s", l.Text)
		}
	}

	// Data into A, which A would replicate to B.
	ra := newResticClient(t, a.ports[0], "population-registry")
	mustRestic(t, ra, "init")
	mustRestic(t, ra, "backup", randomTree(t, 2, 1<<20))
	deadline := time.Now().Add(2 * time.Minute)
	for roguePeer.hellos.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Second)
	}

	if rogueBroker.hellos.Load() == 0 || roguePeer.hellos.Load() == 0 {
		t.Fatalf("A never reached the impostors (broker %d, peer %d handshakes): the test shows nothing",
			rogueBroker.hellos.Load(), roguePeer.hellos.Load())
	}
	if n := rogueBroker.requests.Load(); n != 0 {
		t.Fatalf("the impostor broker received %d requests", n)
	}
	if n := roguePeer.requests.Load(); n != 0 {
		t.Fatalf("the impostor peer received %d requests", n)
	}
	if n := hb.depositCount(); n != depositsBefore {
		t.Fatalf("the real brokers received %d share deposits for a disk broker-b's share never reached", n-depositsBefore)
	}
	t.Logf("impostor broker: %d handshakes, 0 requests; impostor peer: %d handshakes, 0 requests",
		rogueBroker.hellos.Load(), roguePeer.hellos.Load())
}

// consoleHasMsg reports whether a recorded console has a structured line
// with msg.
func consoleHasMsg(lines []vm.Line, msg string) bool {
	for _, l := range lines {
		if bootreport.JSONMsg(l.Text) == msg {
			return true
		}
	}
	return false
}

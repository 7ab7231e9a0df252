package broker_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/protocol/identity"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// impostor is a TLS server that records what reaches it: handshakes begun
// and HTTP requests (with their bodies) that got through.
type impostor struct {
	hellos   atomic.Int64
	requests atomic.Int64
	bodies   atomic.Pointer[[]byte]
	srv      *http.Server
}

func startImpostor(t *testing.T, ln net.Listener, cert tls.Certificate) *impostor {
	t.Helper()
	im := &impostor{}
	im.srv = &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			im.requests.Add(1)
			b, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
			im.bodies.Store(&b)
			w.Write([]byte("{}"))
		}),
		TLSConfig: &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			im.hellos.Add(1)
			return nil, nil
		}, Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequestClientCert},
		ErrorLog: log.New(io.Discard, "", 0),
	}
	go im.srv.ServeTLS(ln, "", "")
	t.Cleanup(func() { im.srv.Close() })
	return im
}

// TestStolenBrokerCAImpersonatesNoOne is the attack from a broker's side:
// the test holds broker-a's root CA key (stolen, or broker-a's admin gone
// rogue) and mints what it likes. Standing in for broker-b at its address,
// it gets no share deposit (nor any request at all); posing as a peer,
// an appliance's twin refuses it. The controls show that the same
// impostor would get the deposit from an appliance that trusted all
// brokers' CAs for every broker (the old shared root), and that the
// genuine appliance's certificates pass the same check.
func TestStolenBrokerCAImpersonatesNoOne(t *testing.T) {
	e := newEnv(t, 3, 2)
	d := tpmtest.NewBootDigests("image-1")
	a := e.boot(1, d, attester.EKRSA)
	defer a.shutdown()
	provision(t, e, a, d)
	e.opAll(http.MethodPost, api.PathAppliances+a.c.ID()+"/disks", api.DiskApprovalRequest{Count: 1})
	results, err := a.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 3)
	if err != nil {
		t.Fatal(err)
	}
	defer attest.Round(results).WipeShares()
	stolen := e.brokers[0].root

	// broker-b goes away; the impostor answers at its address with a
	// certificate for that address from broker-a's root.
	addr := strings.TrimPrefix(e.cfg.Brokers[1].Endpoints[0], "https://")
	e.stop(1)
	key, _ := pki.NewKey()
	leaf, err := stolen.Leaf("broker-b", []string{"127.0.0.1"}, &key.PublicKey, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	im := startImpostor(t, ln, pki.TLSCertificate(leaf, key))

	t.Run("deposit", func(t *testing.T) {
		secret := bytes.Repeat([]byte{0x5a}, 32)
		err := a.c.Deposit(context.Background(), results, "disk-2", secret)
		var ue x509.UnknownAuthorityError
		if err == nil || !errors.As(err, &ue) || !strings.Contains(err.Error(), "broker-b") {
			t.Fatalf("deposit with an impostor for broker-b: %v, want broker-b's certificate refused", err)
		}
		if im.hellos.Load() == 0 {
			t.Fatal("the appliance never reached the impostor: the test shows nothing")
		}
		if n := im.requests.Load(); n != 0 {
			t.Fatalf("the impostor received %d requests", n)
		}
		// broker-a and broker-c took theirs: each is checked against its
		// own CA only.
		for _, i := range []int{0, 2} {
			if got := e.applianceState(i, a.c.ID()).Disks; len(got) != 2 {
				t.Errorf("broker %d holds shares of %d disks, want 2", i, len(got))
			}
		}

		// Control: an appliance that believed every broker's CA for each
		// broker hands the impostor share b.
		all := map[string]*x509.CertPool{}
		for _, b := range e.cfg.Brokers {
			all[b.Name] = e.rootPool()
		}
		trusting, err := attest.New(e.cfg, all, a.tpm, a.tlsKey, func() ([]byte, error) { return a.log, nil }, quiet())
		if err != nil {
			t.Fatal(err)
		}
		trusting.Deposit(context.Background(), results, "disk-3", secret)
		if im.requests.Load() != 1 || im.bodies.Load() == nil || !bytes.Contains(*im.bodies.Load(), []byte("disk-3")) {
			t.Fatalf("control: the shared-trust appliance's deposit did not reach the impostor (%d requests)", im.requests.Load())
		}
	})

	t.Run("peer", func(t *testing.T) {
		ids := a.c.Verifier()
		// What a twin checks a peer with: the handshake's chain through
		// the appliance's Verifier (appliance/replicate does the same).
		dialPeer := func(cert tls.Certificate) (identity.Attested, error) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			srv := startImpostor(t, ln, cert)
			defer srv.srv.Close()
			var got identity.Attested
			conn, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{InsecureSkipVerify: true,
				VerifyConnection: func(cs tls.ConnectionState) error {
					var err error
					got, err = ids.Verify(cs.PeerCertificates, time.Now(), x509.ExtKeyUsageServerAuth)
					return err
				}})
			if err == nil {
				conn.Close()
			}
			return got, err
		}
		peerID := strings.Repeat("b", 32)
		pkey, _ := pki.NewKey()
		// Under broker-a's root: a leaf as broker-a, and a "broker-b
		// service CA" of its own making with a leaf under it.
		asA, err := stolen.Leaf(peerID, []string{identity.DNSName(peerID)}, &pkey.PublicKey, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		fakeB, err := stolen.NewIntermediate("broker-b service CA", time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		asB, err := fakeB.Leaf(peerID, []string{identity.DNSName(peerID)}, &pkey.PublicKey, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		rogue := pki.TLSCertificate(asA, pkey, asB, fakeB.Cert)
		if _, err := dialPeer(rogue); !errors.Is(err, identity.ErrNotAgreed) {
			t.Fatalf("peer minted with broker-a's CA alone: %v, want refused (%v)", err, identity.ErrNotAgreed)
		}
		// Control: the genuine appliance's certificate, every broker's
		// for its key.
		got, err := dialPeer(*attest.Round(results).Certificate())
		if err != nil || got.ID != a.c.ID() || len(got.Brokers) != 3 {
			t.Fatalf("genuine appliance: %+v, %v", got, err)
		}
	})
}

package qemutests

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/images/devpki"
	"github.com/dataembassy/embassy/images/imagekey"
	"github.com/dataembassy/embassy/operator/opclient"
	"github.com/dataembassy/embassy/qemu-tests/vm"
)

// hostBrokers are the three key brokers of the local-default image config,
// run in the test process on 127.0.0.1:7441-7443; the guest reaches them
// through each NIC's gateway (10.0.2.2, 10.0.3.2).
type hostBrokers struct {
	t    *testing.T
	b    []*broker.Broker
	srv  []*http.Server
	tlsc []*tls.Config
	// ops is an operator client of the brokers' operator APIs
	// (127.0.0.1:8441-8443), as embassyctl uses them.
	ops *opclient.Client
}

// stop closes broker i's listener (its state stays).
func (hb *hostBrokers) stop(i int) {
	if hb.srv[i] != nil {
		hb.srv[i].Close()
		hb.srv[i] = nil
	}
}

// serve (re)starts broker i on 127.0.0.1:7441+i.
func (hb *hostBrokers) serve(i int) {
	hb.t.Helper()
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", 7441+i))
	if err != nil {
		hb.t.Fatalf("broker port: %v", err)
	}
	srv := &http.Server{Handler: hb.b[i].ApplianceHandler(), TLSConfig: hb.tlsc[i]}
	go srv.ServeTLS(ln, "", "")
	hb.srv[i] = srv
}

func startHostBrokers(t *testing.T) *hostBrokers {
	t.Helper()
	pkiDir := filepath.Join(cacheDir(), "pki")
	root, err := pki.LoadIssuer(filepath.Join(pkiDir, "broker-ca.pem"), filepath.Join(pkiDir, "broker-ca.key"))
	if err != nil {
		t.Fatalf("local broker CA (built with the image): %v", err)
	}
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
	opCA, err := devpki.Ensure(pkiDir, "operator-ca", "embassy local home-state operator CA")
	if err != nil {
		t.Fatal(err)
	}
	opCert, opKey, err := devpki.EnsureLeaf(pkiDir, "operator", "operator (local default)", opCA)
	if err != nil {
		t.Fatal(err)
	}
	opPool, err := pki.LoadPool(opCA.CertPath)
	if err != nil {
		t.Fatal(err)
	}
	var opBrokers []opclient.Broker
	for i := 0; i < 3; i++ {
		name := fmt.Sprintf("broker-%c", 'a'+i)
		svc, err := root.NewIntermediate(name+" service CA", 24*time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		key, _ := pki.NewKey()
		leaf, err := root.Leaf(name, []string{"10.0.2.2", "10.0.3.2", "127.0.0.1"}, &key.PublicKey, 24*time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		master := make([]byte, 32)
		rand.Read(master)
		b, err := broker.New(broker.Config{Name: name, Dir: t.TempDir(), MasterKey: master, ManufacturerCAs: manu,
			ImageKey: img, ServiceCA: svc, ReattestAfter: 10 * time.Second, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			t.Fatal(err)
		}
		hb.b = append(hb.b, b)
		hb.srv = append(hb.srv, nil)
		hb.tlsc = append(hb.tlsc, b.ApplianceTLSConfig(pki.TLSCertificate(leaf, key)))
		hb.serve(i)
		opLn, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", 8441+i))
		if err != nil {
			t.Fatalf("operator port: %v", err)
		}
		opSrv := &http.Server{Handler: b.OperatorHandler(), TLSConfig: broker.OperatorTLSConfig(pki.TLSCertificate(leaf, key), opPool)}
		go opSrv.ServeTLS(opLn, "", "")
		t.Cleanup(func() { opSrv.Close() })
		opBrokers = append(opBrokers, opclient.Broker{Name: name, URL: fmt.Sprintf("https://127.0.0.1:%d", 8441+i)})
	}
	cert, err := tls.LoadX509KeyPair(opCert, opKey)
	if err != nil {
		t.Fatal(err)
	}
	hb.ops = opclient.New(opBrokers, cert, root.Pool())
	t.Cleanup(func() {
		for i := range hb.b {
			hb.stop(i)
			hb.b[i].Close()
		}
	})
	return hb
}

//go:build cgo

package keybroker

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dataembassy/embassy/broker/hsm"
	"github.com/dataembassy/embassy/broker/hsm/hsmtest"
	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/broker/seal"
	"github.com/dataembassy/embassy/images/imagekey"
)

// TestInitServeWithSoftHSM2: init --pkcs11-* generates the master key in
// the token and writes no master key file; serve's loading with the same
// flags seals and opens with it, and refuses missing or other flags.
func TestInitServeWithSoftHSM2(t *testing.T) {
	cfg := hsmtest.Token(t, "broker-a", "")
	tmp := t.TempDir()
	cert, key := brokerCA(t, tmp)
	pin := filepath.Join(tmp, "pin")
	if err := os.WriteFile(pin, append(cfg.PIN, '\n'), 0o600); err != nil {
		t.Fatal(err)
	}
	p := pkcs11Options{module: cfg.Module, tokenLabel: cfg.TokenLabel, pinFile: pin, keyLabel: "broker-a-master"}
	dir := filepath.Join(tmp, "broker")
	var out bytes.Buffer
	if err := initBroker(&out, initOptions{dir: dir, name: "broker-a", caCert: cert, caKey: key, hosts: "127.0.0.1", p11: p}); err != nil {
		t.Fatal(err)
	}
	t.Log(strings.TrimSpace(out.String()))
	if _, err := os.Stat(filepath.Join(dir, MasterKeyFile)); err == nil {
		t.Fatal("init wrote a master key file")
	}
	if err := initBroker(&out, initOptions{dir: dir, name: "broker-a", caCert: cert, caKey: key, p11: p}); err == nil ||
		!strings.Contains(err.Error(), "already initialised") {
		t.Fatalf("second init: %v", err)
	}

	mk, _, _, err := loadState(dir, p)
	if err != nil {
		t.Fatal(err)
	}
	sealed, err := mk.sealer.Seal([]byte("share"), []byte("aad"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(sealed, seal.Header(seal.PKCS11)) {
		t.Fatalf("not sealed by the token: %x", sealed)
	}
	if got, err := mk.sealer.Open(sealed, []byte("aad")); err != nil || string(got) != "share" {
		t.Fatalf("open: %q, %v", got, err)
	}
	mk.close()

	for _, tc := range []struct {
		name string
		p    pkcs11Options
		want string
	}{
		{"no flags", pkcs11Options{}, "keeps its master key in PKCS#11 token \"broker-a\""},
		{"another key label", pkcs11Options{module: p.module, tokenLabel: p.tokenLabel, pinFile: p.pinFile, keyLabel: "other"}, "not key \"other\""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, _, err := loadState(dir, tc.p)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
		})
	}
}

// TestCAKeysInSoftHSM2: init --pkcs11-* through the command line puts the
// CA keys it creates in the token (the root's only when it creates the
// root; an adopted root's key stays where the operators keep it) and
// writes neither broker-ca.key nor service-ca.key; serve, started the
// same way, answers TLS that chains to broker-ca.pem and signs with the
// token's service CA key, whose certificates verify under the root.
func TestCAKeysInSoftHSM2(t *testing.T) {
	for _, tc := range []struct {
		name    string
		adopted bool
	}{
		{"root created by init", false},
		{"root adopted", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := hsmtest.Token(t, "broker-a", "")
			tmp := t.TempDir()
			pin := filepath.Join(tmp, "pin")
			if err := os.WriteFile(pin, append(cfg.PIN, '\n'), 0o600); err != nil {
				t.Fatal(err)
			}
			dir := filepath.Join(tmp, "broker")
			p11 := []string{"--pkcs11-module", cfg.Module, "--pkcs11-token-label", cfg.TokenLabel,
				"--pkcs11-pin-file", pin, "--pkcs11-key-label", "broker-a-master"}
			args := append([]string{"init", "--dir", dir, "--name", "broker-a", "--hosts", "127.0.0.1"}, p11...)
			if tc.adopted {
				cert, key := brokerCA(t, tmp)
				args = append(args, "--broker-ca-cert", cert, "--broker-ca-key", key)
			}
			out, err := run(context.Background(), args...)
			if err != nil {
				t.Fatalf("init: %v\n%s", err, out)
			}
			t.Log(strings.TrimSpace(out))
			for _, f := range []string{ServiceCAKeyFile, BrokerCAKeyFile, MasterKeyFile} {
				if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
					t.Errorf("init wrote %s", f)
				}
			}
			rec, err := readPKCS11Record(dir)
			if err != nil {
				t.Fatal(err)
			}
			wantRoot := "broker-a-master" + RootCAKeySuffix
			if tc.adopted {
				wantRoot = ""
			}
			if rec.ServiceCAKeyLabel != "broker-a-master"+ServiceCAKeySuffix || rec.RootCAKeyLabel != wantRoot {
				t.Fatalf("record %+v", rec)
			}
			root, err := pki.LoadCert(filepath.Join(dir, BrokerCAFile))
			if err != nil {
				t.Fatal(err)
			}
			roots := x509.NewCertPool()
			roots.AddCert(root)
			if !tc.adopted {
				// The root certificate is signed by the token's root key.
				c := cfg
				c.KeyLabel = wantRoot
				s, err := hsm.OpenSigner(c)
				if err != nil {
					t.Fatal(err)
				}
				if !s.Public().(*ecdsa.PublicKey).Equal(root.PublicKey) {
					t.Error("broker-ca.pem is not the certificate of the token's root key")
				}
				s.Close()
			}

			// The service CA as serve loads it issues appliance
			// certificates that verify under the root.
			mk, svc, _, err := loadState(dir, pkcs11Options{module: cfg.Module, tokenLabel: cfg.TokenLabel, pinFile: pin, keyLabel: "broker-a-master"})
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := svc.Key.(*hsm.Signer); !ok {
				t.Fatalf("service CA key is a %T, not the token's", svc.Key)
			}
			k, _ := pki.NewKey()
			leaf, err := svc.Leaf("appliance", []string{"127.0.0.1"}, &k.PublicKey, time.Minute)
			if err != nil {
				t.Fatal(err)
			}
			inter := x509.NewCertPool()
			inter.AddCert(svc.Cert)
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter}); err != nil {
				t.Fatalf("appliance certificate: %v", err)
			}
			mk.close()

			// serve from the command line with the same flags.
			manu, _ := brokerCA(t, t.TempDir())
			imagePub := filepath.Join(tmp, "image.pub")
			_, imageKey, _ := ed25519.GenerateKey(rand.Reader)
			pubPEM, _ := imagekey.EncodePublic(imageKey.Public().(ed25519.PublicKey))
			os.WriteFile(imagePub, pubPEM, 0o644)
			appAddr, opAddr := freePort(t), freePort(t)
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			var log strings.Builder
			go func() {
				out, err := run(ctx, append([]string{"serve", "--dir", dir, "--name", "broker-a", "--manufacturer-ca", manu,
					"--image-pubkey", imagePub, "--appliance-listen", appAddr, "--operator-listen", opAddr}, p11...)...)
				log.WriteString(out)
				done <- err
			}()
			var conn *tls.Conn
			for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
				if conn, err = tls.Dial("tcp", appAddr, &tls.Config{RootCAs: roots, ServerName: "127.0.0.1"}); err == nil {
					break
				}
			}
			if err != nil {
				cancel()
				<-done
				t.Fatalf("serve's appliance API: %v\n%s", err, log.String())
			}
			conn.Close()
			cancel()
			if err := <-done; err != nil {
				t.Fatalf("serve: %v\n%s", err, log.String())
			}
			if !strings.Contains(log.String(), "service CA key in the PKCS#11 token") {
				t.Errorf("serve does not say its service CA key is in the token:\n%s", log.String())
			}
			for _, f := range []string{ServiceCAKeyFile, BrokerCAKeyFile, MasterKeyFile} {
				if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
					t.Errorf("serve wrote %s", f)
				}
			}
		})
	}
}

// TestInitRollsBackCAKeys: an init that fails after generating the CA
// keys in the token (here: the master key's label is taken) destroys them
// again and leaves the folder uninitialised.
func TestInitRollsBackCAKeys(t *testing.T) {
	cfg := hsmtest.Token(t, "broker-a", "broker-a-master")
	if err := hsm.GenerateKey(cfg); err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	pin := filepath.Join(tmp, "pin")
	os.WriteFile(pin, append(cfg.PIN, '\n'), 0o600)
	dir := filepath.Join(tmp, "broker")
	p := pkcs11Options{module: cfg.Module, tokenLabel: cfg.TokenLabel, pinFile: pin, keyLabel: cfg.KeyLabel}
	var out bytes.Buffer
	if err := initBroker(&out, initOptions{dir: dir, name: "broker-a", hosts: "127.0.0.1", p11: p}); !errors.Is(err, hsm.ErrKeyExists) {
		t.Fatalf("init over a taken master key label: %v", err)
	}
	if initialised(dir) {
		t.Fatal("the failed init left the folder initialised")
	}
	for _, suffix := range []string{RootCAKeySuffix, ServiceCAKeySuffix} {
		c := cfg
		c.KeyLabel += suffix
		if s, err := hsm.OpenSigner(c); !errors.Is(err, hsm.ErrKeyNotFound) {
			if s != nil {
				s.Close()
			}
			t.Errorf("key %q after the failed init: %v", c.KeyLabel, err)
		}
	}
}

// run executes the keybroker command line.
func run(ctx context.Context, args ...string) (string, error) {
	var out syncBuffer
	root := NewRootCmd()
	root.SetOut(&out)
	root.SetErr(&out)
	root.SilenceErrors, root.SilenceUsage = true, true
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	return out.String(), err
}

// syncBuffer is a bytes.Buffer safe for serve's concurrent logging.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

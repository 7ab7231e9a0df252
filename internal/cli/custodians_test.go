package cli_test

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/images/devpki"
	"github.com/dataembassy/embassy/internal/cli/embassyctl"
	"github.com/dataembassy/embassy/internal/cli/keybroker"
	"github.com/dataembassy/embassy/operator/opclient"
)

// TestCustodiansPerBroker: keybroker init gives each broker its own
// custodian CA and first custodian, custodian add issues more, a custodian
// certificate verifies only under its own broker's CA, revoke records the
// fingerprint, and embassyctl brokers add writes one credential per broker.
func TestCustodiansPerBroker(t *testing.T) {
	tmp := t.TempDir()
	brokerCA, err := devpki.Ensure(filepath.Join(tmp, "pki"), "broker-ca", "test broker CA")
	if err != nil {
		t.Fatal(err)
	}
	dirs := map[string]string{}
	for _, b := range []struct{ name, custodian string }{{"broker-a", "alice"}, {"broker-b", "bob"}} {
		dirs[b.name] = filepath.Join(tmp, b.name)
		out, err := execute(keybroker.NewRootCmd(), "init", "--dir", dirs[b.name], "--name", b.name,
			"--broker-ca-cert", brokerCA.CertPath, "--broker-ca-key", brokerCA.KeyPath, "--custodian", b.custodian)
		if err != nil {
			t.Fatalf("init %s: %v\n%s", b.name, err, out)
		}
		if !strings.Contains(out, "custodian "+b.custodian+" of broker "+b.name) {
			t.Errorf("init output:\n%s", out)
		}
	}
	out, err := execute(keybroker.NewRootCmd(), "custodian", "add", "--dir", dirs["broker-a"], "--name", "dave")
	if err != nil {
		t.Fatalf("custodian add: %v\n%s", err, out)
	}
	if _, err := execute(keybroker.NewRootCmd(), "custodian", "add", "--dir", dirs["broker-a"], "--name", "dave"); err == nil {
		t.Error("a second dave was issued over the first")
	}
	if _, err := execute(keybroker.NewRootCmd(), "custodian", "add", "--dir", dirs["broker-a"], "--name", "../x"); err == nil {
		t.Error("a custodian name with a path was accepted")
	}
	cred := func(broker, name string) string {
		return filepath.Join(dirs[broker], keybroker.CustodiansDir, name+".pem")
	}
	pool := func(broker string) *x509.CertPool {
		p, err := pki.LoadPool(filepath.Join(dirs[broker], keybroker.CustodianCAFile))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	tests := []struct {
		cert, at string
		ok       bool
	}{
		{cred("broker-a", "alice"), "broker-a", true},
		{cred("broker-a", "dave"), "broker-a", true},
		{cred("broker-b", "bob"), "broker-b", true},
		{cred("broker-a", "alice"), "broker-b", false},
		{cred("broker-b", "bob"), "broker-a", false},
	}
	for _, tc := range tests {
		c, err := pki.LoadCert(tc.cert)
		if err != nil {
			t.Fatal(err)
		}
		_, err = c.Verify(x509.VerifyOptions{Roots: pool(tc.at), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
		if (err == nil) != tc.ok {
			t.Errorf("%s at %s: verify %v, want ok=%v", tc.cert, tc.at, err, tc.ok)
		}
	}

	if out, err := execute(keybroker.NewRootCmd(), "custodian", "revoke", "--dir", dirs["broker-a"], "--cert", cred("broker-a", "dave")); err != nil {
		t.Fatalf("revoke: %v\n%s", err, out)
	}
	revoked, _ := os.ReadFile(filepath.Join(dirs["broker-a"], keybroker.RevokedCustodiansFile))
	dave, _ := pki.LoadCert(cred("broker-a", "dave"))
	if !strings.Contains(string(revoked), fingerprintOf(dave)) {
		t.Errorf("revoked-custodians:\n%s", revoked)
	}

	// alice's embassyctl list: her credential per broker (here she is
	// also given one at broker-b, as a second custodian would be).
	if _, err := execute(keybroker.NewRootCmd(), "custodian", "add", "--dir", dirs["broker-b"], "--name", "alice"); err != nil {
		t.Fatal(err)
	}
	list := filepath.Join(tmp, "ops", "operator.json")
	for i, b := range []string{"broker-a", "broker-b"} {
		key := strings.TrimSuffix(cred(b, "alice"), ".pem") + ".key"
		if out, err := execute(embassyctl.NewRootCmd(), "--brokers", list, "brokers", "add", b, "https://127.0.0.1:844"+string(rune('1'+i)),
			"--ca", brokerCA.CertPath, "--cert", cred(b, "alice"), "--key", key); err != nil {
			t.Fatalf("brokers add %s: %v\n%s", b, err, out)
		}
	}
	got, err := opclient.LoadBrokers(list)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Cert != cred("broker-a", "alice") || got[1].Cert != cred("broker-b", "alice") || got[1].CA == "" {
		t.Fatalf("list %+v", got)
	}
	// Missing files and half a credential are refused with what to do.
	for _, args := range [][]string{
		{"broker-c", "https://127.0.0.1:8443", "--cert", filepath.Join(tmp, "nope.pem"), "--key", filepath.Join(tmp, "nope.key")},
		{"broker-c", "https://127.0.0.1:8443", "--cert", cred("broker-a", "alice")},
		{"broker-c", "https://127.0.0.1:8443", "--ca", filepath.Join(tmp, "nope.pem")},
	} {
		_, err := execute(embassyctl.NewRootCmd(), append([]string{"--brokers", list, "brokers", "add"}, args...)...)
		if err == nil || !strings.Contains(err.Error(), "next:") {
			t.Errorf("brokers add %v: %v", args, err)
		}
	}
	// A credential file gone since: embassyctl names the broker and file.
	os.Rename(cred("broker-b", "alice"), cred("broker-b", "alice")+".moved")
	_, err = execute(embassyctl.NewRootCmd(), "--brokers", list, "status")
	if err == nil || !strings.Contains(err.Error(), "broker broker-b: client certificate") {
		t.Errorf("status with a missing credential: %v", err)
	}
}

// TestLoadBrokersChecksTheList: the broker list is bounded, strict and
// consistent, and every error is an ErrBrokerList naming the entry.
func TestLoadBrokersChecksTheList(t *testing.T) {
	dir := t.TempDir()
	ok := `{"name":"broker-a","url":"https://127.0.0.1:8441","ca":"ca.pem","cert":"a.pem","key":"a.key"}`
	tests := []struct {
		name, body, want string
	}{
		{"relative paths", "[" + ok + "]", ""},
		{"empty", "[]", "lists no broker"},
		{"unknown field", `[{"name":"a","url":"https://x:1","certificate":"a.pem"}]`, "unknown field"},
		{"trailing data", "[" + ok + "] []", "data after the list"},
		{"duplicate", "[" + ok + "," + ok + "]", "listed twice"},
		{"http url", `[{"name":"a","url":"http://x:1"}]`, "is not https://HOST:PORT"},
		{"no host", `[{"name":"a","url":"https://"}]`, "is not https://HOST:PORT"},
		{"cert without key", `[{"name":"a","url":"https://x:1","cert":"a.pem"}]`, "give both or neither"},
		{"short audit key", `[{"name":"a","url":"https://x:1","audit_key":"AAAA"}]`, "audit_key is 3 bytes"},
		{"too large", "[" + strings.Repeat(" ", opclient.MaxListBytes) + "]", "larger than"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, "list.json")
			if err := os.WriteFile(path, []byte(tc.body), 0o644); err != nil {
				t.Fatal(err)
			}
			got, err := opclient.LoadBrokers(path)
			if tc.want == "" {
				if err != nil || got[0].Cert != filepath.Join(dir, "a.pem") || got[0].CA != filepath.Join(dir, "ca.pem") {
					t.Fatalf("%v %+v", err, got)
				}
				return
			}
			if !errors.Is(err, opclient.ErrBrokerList) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an ErrBrokerList saying %q", err, tc.want)
			}
		})
	}
	var brokers []opclient.Broker
	json.Unmarshal([]byte("["+ok+"]"), &brokers)
	if brokers[0].HasCert() != true {
		t.Fatal("HasCert")
	}
}

func fingerprintOf(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:])
}

// TestInitCreatesOwnRootCA: keybroker init without --broker-ca-* gives each
// broker a root CA of its own; the broker's TLS and service CA chain to
// that root and to no other broker's.
func TestInitCreatesOwnRootCA(t *testing.T) {
	tmp := t.TempDir()
	roots := map[string]*x509.Certificate{}
	for _, name := range []string{"broker-a", "broker-b"} {
		dir := filepath.Join(tmp, name)
		out, err := execute(keybroker.NewRootCmd(), "init", "--dir", dir, "--name", name)
		if err != nil {
			t.Fatalf("init %s: %v\n%s", name, err, out)
		}
		if !strings.Contains(out, "--broker-ca "+name+"=") {
			t.Errorf("init does not say how to pin the root CA in the image:\n%s", out)
		}
		root, err := pki.LoadIssuer(filepath.Join(dir, keybroker.BrokerCAFile), filepath.Join(dir, keybroker.BrokerCAKeyFile))
		if err != nil {
			t.Fatal(err)
		}
		if st, err := os.Stat(filepath.Join(dir, keybroker.BrokerCAKeyFile)); err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("root CA key mode: %v %v", st, err)
		}
		roots[name] = root.Cert
	}
	if roots["broker-a"].Equal(roots["broker-b"]) {
		t.Fatal("two brokers share a root CA")
	}
	for _, name := range []string{"broker-a", "broker-b"} {
		svc, err := pki.LoadCert(filepath.Join(tmp, name, "service-ca.pem"))
		if err != nil {
			t.Fatal(err)
		}
		tlsCert, err := pki.LoadCert(filepath.Join(tmp, name, "tls.pem"))
		if err != nil {
			t.Fatal(err)
		}
		for other, root := range roots {
			pool := x509.NewCertPool()
			pool.AddCert(root)
			_, svcErr := svc.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
			_, tlsErr := tlsCert.Verify(x509.VerifyOptions{Roots: pool})
			if own := other == name; (svcErr == nil) != own || (tlsErr == nil) != own {
				t.Errorf("%s's service CA / TLS certificate under %s's root: %v / %v", name, other, svcErr, tlsErr)
			}
		}
	}
	if _, err := execute(keybroker.NewRootCmd(), "init", "--dir", filepath.Join(tmp, "c"), "--name", "c", "--broker-ca-cert", filepath.Join(tmp, "broker-a", keybroker.BrokerCAFile)); err == nil {
		t.Fatal("init took --broker-ca-cert without its key")
	}
}

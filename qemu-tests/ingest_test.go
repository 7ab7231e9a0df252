package qemutests

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/images/build"
	"github.com/dataembassy/embassy/images/devpki"
	"github.com/dataembassy/embassy/protocol/identity"
	"github.com/dataembassy/embassy/qemu-tests/vm"
)

// brokerNames are the brokers of the local-default image config.
var brokerNames = []string{"broker-a", "broker-b", "broker-c"}

// brokerRoot is broker i's own root CA, the one the image pins for it
// (mkimage's local default in the cache).
func brokerRoot(t testing.TB, i int) *pki.Issuer {
	t.Helper()
	ca, err := devpki.BrokerCA(filepath.Join(cacheDir(), "pki"), brokerNames[i])
	if err != nil {
		t.Fatal(err)
	}
	root, err := pki.LoadIssuer(ca.CertPath, ca.KeyPath)
	if err != nil {
		t.Fatalf("%s root CA (built with the image): %v", brokerNames[i], err)
	}
	return root
}

// rootPool trusts every broker's root: what a client that checks an
// appliance the standard way (restic) is given.
func rootPool(t testing.TB) *x509.CertPool {
	t.Helper()
	p := x509.NewCertPool()
	for i := range brokerNames {
		p.AddCert(brokerRoot(t, i).Cert)
	}
	return p
}

// rootsFile writes rootPool's certificates as a PEM bundle (restic's
// --cacert) and returns its path.
func rootsFile(t testing.TB) string {
	t.Helper()
	var b []byte
	for i := range brokerNames {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: brokerRoot(t, i).Cert.Raw})...)
	}
	path := filepath.Join(t.TempDir(), "broker-roots.pem")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// applianceIDs decides an appliance's identity as a twin does: 2 of the 3
// brokers, each through its own root, must vouch for its key.
func applianceIDs(t testing.TB) identity.Verifier {
	t.Helper()
	v := identity.Verifier{Threshold: 2}
	for i, n := range brokerNames {
		v.Brokers = append(v.Brokers, identity.Authority{Broker: n, Roots: brokerRoot(t, i).Pool()})
	}
	return v
}

// resticClient holds what the host-side restic needs to reach an
// appliance's ingest service through a host port forward.
type resticClient struct {
	url, caFile, certFile string
	// packMiB, if set, is restic's --pack-size: the drills that act after
	// so many stored packs reach them with less data through TCG.
	packMiB int
}

func newResticClient(t testing.TB, port int, clientName string) *resticClient {
	t.Helper()
	pkiDir := filepath.Join(cacheDir(), "pki")
	ca, err := pki.LoadIssuer(filepath.Join(pkiDir, "client-ca.pem"), filepath.Join(pkiDir, "client-ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	key, _ := pki.NewKey()
	leaf, err := ca.Leaf(clientName, nil, &key.PublicKey, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKCS8PrivateKey(key)
	certFile := filepath.Join(t.TempDir(), "client.pem")
	os.WriteFile(certFile, append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Raw}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})...), 0o600)
	return &resticClient{url: fmt.Sprintf("rest:https://127.0.0.1:%d/population/", port),
		caFile: rootsFile(t), certFile: certFile}
}

func (r *resticClient) run(t testing.TB, args ...string) (string, error) {
	t.Helper()
	return r.runContext(context.Background(), args...)
}

// runContext runs restic until it ends or ctx is cancelled (killed).
func (r *resticClient) runContext(ctx context.Context, args ...string) (string, error) {
	full := []string{"-r", r.url, "--cacert", r.caFile, "--tls-client-cert", r.certFile, "--no-cache"}
	if r.packMiB > 0 {
		full = append(full, "--pack-size", strconv.Itoa(r.packMiB))
	}
	full = append(full, args...)
	cmd := exec.CommandContext(ctx, "restic", full...)
	cmd.Env = append(os.Environ(), "RESTIC_PASSWORD=population register key")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// sourceTree is a real directory tree of about 77 MiB: the network
// drivers of the Debian kernel the image was built from.
func sourceTree(t testing.TB) string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(cacheDir(), "kernel", "*.unpacked", "lib", "modules", "*", "kernel", "drivers", "net"))
	if len(m) == 0 {
		t.Fatal("no unpacked kernel in the cache; run make image")
	}
	return m[0]
}

// TestRackAndIngest: a fresh server with blank disks is enrolled, its
// image and disks approved; it provisions the disks and serves ingest.
// The home state backs up a real tree with restic over mutual TLS, checks
// it with --read-data, and after a reboot (no operator action) restores it
// identically.
func TestRackAndIngest(t *testing.T) {
	parallelScenario(t, 1, 75*time.Second)
	if _, err := exec.LookPath("restic"); err != nil {
		t.Fatal("restic not installed (make deps installs it)")
	}
	dir := imageDir()
	m := loadImage(t, dir)
	hb := startHostBrokers(t)
	port, err := vm.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	cfg := bootConfig(t, "rack", dir)
	cfg.StateDir = t.TempDir()
	cfg.Disks = []string{rawDisk(t, 512<<20), rawDisk(t, 512<<20)}
	cfg.Forwards = []vm.Forward{{NIC: 0, HostPort: port, GuestPort: 8443}}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	v := startVM(t, cfg)
	_, id := waitMsg(t, ctx, v, 0, logmsg.MsgIdentity)
	waitMsg(t, ctx, v, 0, logmsg.MsgEnrollRequested)
	mb, _ := os.ReadFile(filepath.Join(dir, build.ManifestFile))
	sb, _ := os.ReadFile(filepath.Join(dir, build.SignatureFile))
	for _, b := range hb.b {
		b.ApproveEnrollment(hb.op(b), id["appliance_id"].(string))
		if _, err := b.ApproveManifest(hb.op(b), mb, sb); err != nil {
			t.Fatal(err)
		}
		b.ApproveDisks(hb.op(b), id["appliance_id"].(string), 2)
	}
	waitMsg(t, ctx, v, 0, logmsg.MsgServing)

	src := sourceTree(t)
	rc := newResticClient(t, port, "population-registry")
	for _, step := range [][]string{{"init"}, {"backup", src}, {"check", "--read-data"}} {
		start := time.Now()
		out, err := rc.run(t, step...)
		if err != nil {
			t.Fatalf("restic %v: %v\n%s", step, err, out)
		}
		t.Logf("restic %v: %.1fs", step[0], time.Since(start).Seconds())
	}
	// The operators' remote attestation check passes.
	verdict, err := hb.ops.AttestAppliance(ctx, fmt.Sprintf("127.0.0.1:%d", port), applianceIDs(t))
	if err != nil {
		t.Fatal(err)
	}
	if !verdict.Pass || verdict.ImageVersion != m.Version || len(verdict.LastAttestation) != 3 {
		t.Fatalf("remote attestation verdict: %+v", verdict)
	}
	v.Close()

	cfg.Name = "rack-reboot"
	v2 := startVM(t, cfg)
	waitMsg(t, ctx, v2, 0, logmsg.MsgServing)
	dst := t.TempDir()
	if out, err := rc.run(t, "restore", "latest", "--target", dst); err != nil {
		t.Fatalf("restore after reboot: %v\n%s", err, out)
	}
	if out, err := exec.Command("diff", "-r", src, filepath.Join(dst, src)).CombinedOutput(); err != nil {
		t.Fatalf("restored tree differs: %v\n%s", err, out)
	}
}

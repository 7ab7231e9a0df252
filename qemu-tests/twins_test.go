package qemutests

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/appliance/node"
	"github.com/dataembassy/embassy/appliance/replicate"
	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/protocol/identity"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
	"github.com/dataembassy/embassy/qemu-tests/vm"
)

// twin is one appliance of an embassy pair: its VM, its identity and the
// host ports forwarded to its service port through each NIC.
type twin struct {
	name  string
	cfg   vm.Config
	v     *vm.VM
	id    string
	ports [2]int
	boots int
}

// endpoints are where the other appliance reaches this one: through each
// of its NICs' gateways to the host's loopback forwards.
func (tw *twin) endpoints() []string {
	return []string{fmt.Sprintf("%s:%d", hostAlias(0), tw.ports[0]), fmt.Sprintf("%s:%d", hostAlias(1), tw.ports[1])}
}

// restart boots the same server again (same disks, TPM and VARS).
func (tw *twin) restart(t testing.TB) {
	t.Helper()
	tw.boots++
	tw.cfg.Name = fmt.Sprintf("%s-boot%d", tw.name, tw.boots)
	tw.v = startVM(t, tw.cfg)
}

// startTwins boots both appliances of a copied provisioned embassy (the
// brokers know them, their endpoints and disks) and waits until both serve
// and know each other.
func startTwins(t testing.TB, ctx context.Context, hb *hostBrokers, dir string) (*twin, *twin) {
	t.Helper()
	return startTwinsWith(t, ctx, hb, dir, nil)
}

// startTwinsWith is startTwins with prepare, if not nil, called on each
// twin's VM config before it boots.
func startTwinsWith(t testing.TB, ctx context.Context, hb *hostBrokers, dir string, prepare func(*twin)) (*twin, *twin) {
	t.Helper()
	var tws []*twin
	for _, name := range twinNames {
		tw := restTwin(t, hb, dir, name)
		if prepare != nil {
			prepare(tw)
		}
		tw.v = startVM(t, tw.cfg)
		tws = append(tws, tw)
	}
	for _, tw := range tws {
		waitMsg(t, ctx, tw.v, 0, logmsg.MsgServing)
	}
	for i, tw := range tws {
		waitPeer(t, ctx, tw, tws[1-i].id)
	}
	return tws[0], tws[1]
}

// twinDrill is the set-up of every twin test: the three host brokers and
// two enrolled, provisioned appliances (a copy of the provisioned embassy)
// that serve and know each other, a context that bounds the test, and an
// ingest client with a reader's certificate.
func twinDrill(t testing.TB, timeout time.Duration) (context.Context, *hostBrokers, *twin, *twin, *http.Client) {
	t.Helper()
	requireE2E(t)
	hb, dir := copyEmbassy(t)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	a, b := startTwins(t, ctx, hb, dir)
	return ctx, hb, a, b, ingestHTTP(t, "home-state-auditor")
}

// waitPeer waits until tw replicates to the appliance peer.
func waitPeer(t testing.TB, ctx context.Context, tw *twin, peer string) {
	t.Helper()
	if _, _, err := tw.v.WaitFor(ctx, 0, func(s string) bool {
		return bootreport.JSONMsg(s) == "replication peer added" && strings.Contains(s, peer)
	}); err != nil {
		t.Fatalf("%s never took %s as a peer: %v", tw.name, peer, err)
	}
}

// ingestHTTP is an HTTPS client of the ingest API with a certificate from
// the home-state client CA.
func ingestHTTP(t testing.TB, clientName string) *http.Client {
	t.Helper()
	rc := newResticClient(t, 1, clientName)
	cert, err := tls.LoadX509KeyPair(rc.certFile, rc.certFile)
	if err != nil {
		t.Fatal(err)
	}
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		RootCAs: rootPool(t), Certificates: []tls.Certificate{cert}}}}
}

// repoObjects lists the population repository on an appliance through
// its ingest API: "type/name" -> size, plus "config".
func repoObjects(hc *http.Client, port int) (map[string]int64, error) {
	out := map[string]int64{}
	base := fmt.Sprintf("https://127.0.0.1:%d/population/", port)
	for _, typ := range []string{"keys", "data", "index", "snapshots"} {
		req, _ := http.NewRequest(http.MethodGet, base+typ+"/", nil)
		req.Header.Set("Accept", "application/vnd.x.restic.rest.v2")
		resp, err := hc.Do(req)
		if err != nil {
			return nil, err
		}
		var list []struct {
			Name string `json:"name"`
			Size int64  `json:"size"`
		}
		err = json.NewDecoder(resp.Body).Decode(&list)
		resp.Body.Close()
		if err != nil {
			return nil, fmt.Errorf("list %s: %s: %w", typ, resp.Status, err)
		}
		for _, o := range list {
			out[typ+"/"+o.Name] = o.Size
		}
	}
	resp, err := hc.Head(base + "config")
	if err != nil {
		return nil, err
	}
	resp.Body.Close()
	if resp.StatusCode == http.StatusOK {
		out["config"] = resp.ContentLength
	}
	return out, nil
}

func diffObjects(a, b map[string]int64) string {
	var missing []string
	for k, sz := range a {
		if got, ok := b[k]; !ok || got != sz {
			missing = append(missing, k)
		}
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			missing = append(missing, "extra "+k)
		}
	}
	sort.Strings(missing)
	if len(missing) > 5 {
		missing = append(missing[:5], fmt.Sprintf("... %d more", len(missing)-5))
	}
	return strings.Join(missing, ", ")
}

// waitConverged waits until both appliances hold the same objects, and
// returns how many.
func waitConverged(t testing.TB, ctx context.Context, hc *http.Client, a, b *twin) int {
	t.Helper()
	start := time.Now()
	last := ""
	for {
		oa, errA := repoObjects(hc, a.ports[0])
		ob, errB := repoObjects(hc, b.ports[0])
		if errA == nil && errB == nil {
			last = diffObjects(oa, ob)
			if last == "" && len(oa) > 0 {
				t.Logf("%s and %s converged: %d objects in %.1fs", a.name, b.name, len(oa), time.Since(start).Seconds())
				return len(oa)
			}
		} else {
			last = fmt.Sprint(errA, errB)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s and %s never converged; last difference: %s", a.name, b.name, last)
		case <-time.After(2 * time.Second):
		}
	}
}

// health reads an appliance's health endpoint.
func health(hc *http.Client, port int) (*api.Health, error) {
	resp, err := hc.Get(fmt.Sprintf("https://127.0.0.1:%d%s", port, node.PathHealth))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var h api.Health
	if err := json.NewDecoder(resp.Body).Decode(&h); err != nil {
		return nil, err
	}
	return &h, nil
}

// waitZeroLag waits until tw has nothing pending for any peer.
func waitZeroLag(t testing.TB, ctx context.Context, hc *http.Client, tw *twin) {
	t.Helper()
	waitHealth(t, ctx, func() (*api.Health, error) { return health(hc, tw.ports[0]) }, tw.name+": replication lag zero",
		func(h *api.Health) bool {
			for _, p := range h.Peers {
				if p.PendingObjects != 0 {
					return false
				}
			}
			return len(h.Peers) > 0
		})
}

// verifyObject reads an object back through ingest and checks its hash.
func verifyObject(hc *http.Client, port int, nsName string) error {
	repo, rest, _ := strings.Cut(nsName, "/")
	typ, name, _ := strings.Cut(rest, "/")
	u := fmt.Sprintf("https://127.0.0.1:%d/%s/%s/%s", port, repo, typ, name)
	if typ == "config" {
		u = fmt.Sprintf("https://127.0.0.1:%d/%s/config", port, repo)
	}
	resp, err := hc.Get(u)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", nsName, resp.Status)
	}
	h := sha256.New()
	if _, err := io.Copy(h, resp.Body); err != nil {
		return err
	}
	if typ != "config" && hex.EncodeToString(h.Sum(nil)) != name {
		return fmt.Errorf("%s: content does not match its name", nsName)
	}
	return nil
}

// backgroundBackup runs a restic backup and reports its result on done.
// The backup is killed when the test ends.
func backgroundBackup(t testing.TB, rc *resticClient, src string) <-chan error {
	ctx, cancel := context.WithCancel(context.Background())
	return backgroundBackupContext(t, ctx, cancel, rc, src)
}

func backgroundBackupContext(t testing.TB, ctx context.Context, cancel context.CancelFunc, rc *resticClient, src string) <-chan error {
	t.Cleanup(cancel)
	done := make(chan error, 1)
	go func() {
		out, err := rc.runContext(ctx, "backup", src)
		if err != nil {
			err = fmt.Errorf("%v\n%s", err, out)
		}
		done <- err
	}()
	return done
}

// mustRestic runs restic and fails the test on error.
func mustRestic(t testing.TB, rc *resticClient, args ...string) string {
	t.Helper()
	start := time.Now()
	out, err := rc.run(t, args...)
	if err != nil {
		t.Fatalf("restic %v: %v\n%s", args, err, out)
	}
	t.Logf("restic %s: %.1fs", args[0], time.Since(start).Seconds())
	return out
}

// sameTree fails the test unless restored/src equals src.
func sameTree(t testing.TB, src, restored string) {
	t.Helper()
	if out, err := exec.Command("diff", "-r", src, filepath.Join(restored, src)).CombinedOutput(); err != nil {
		t.Fatalf("restored tree differs: %v\n%s", err, out)
	}
}

// TestTwinReplication: a backup into A is on B (check --read-data and a
// restore from B), and a backup into B shows up on A.
func TestTwinReplication(t *testing.T) {
	ctx, _, a, b, hc := twinPair(t, 15*time.Minute)

	src := sourceTree(t)
	ra := newResticClient(t, a.ports[0], "population-registry")
	rb := newResticClient(t, b.ports[0], "population-registry")
	initRepo(t, ra)
	snapshotsBefore := countSnapshots(t, ra)
	mustRestic(t, ra, "backup", src)
	waitConverged(t, ctx, hc, a, b)
	mustRestic(t, rb, "check", "--read-data")
	dst := t.TempDir()
	mustRestic(t, rb, "restore", "latest", "--target", dst)
	sameTree(t, src, dst)

	// The other way: a second snapshot taken into B reaches A.
	second := filepath.Join(filepath.Dir(src), "block")
	mustRestic(t, rb, "backup", second)
	waitConverged(t, ctx, hc, a, b)
	if n := countSnapshots(t, ra); n != snapshotsBefore+2 {
		t.Fatalf("snapshots on A: %d, want the %d there before and the 2 new ones", n, snapshotsBefore)
	}
	mustRestic(t, ra, "check")
	waitZeroLag(t, ctx, hc, a)
	waitZeroLag(t, ctx, hc, b)
}

// countSnapshots returns how many snapshots the repository lists.
func countSnapshots(t *testing.T, rc *resticClient) int {
	t.Helper()
	out := mustRestic(t, rc, "snapshots", "--json")
	var snaps []json.RawMessage
	if err := json.Unmarshal([]byte(out), &snaps); err != nil {
		t.Fatalf("snapshots: %v %s", err, out)
	}
	return len(snaps)
}

// randomTree writes n files of size bytes of random data (incompressible,
// never deduplicated).
func randomTree(t testing.TB, n int, size int) string {
	t.Helper()
	dir := t.TempDir()
	buf := make([]byte, size)
	for i := 0; i < n; i++ {
		rand.Read(buf)
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("register-%03d.bin", i)), buf, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// applianceHealth returns what the brokers last heard from an appliance.
func applianceHealth(ctx context.Context, hb *hostBrokers, id string) *api.Health {
	for _, s := range hb.ops.Status(ctx) {
		if s.State == nil {
			continue
		}
		for _, a := range s.State.Appliances {
			if a.ID == id && a.Health != nil {
				return a.Health
			}
		}
	}
	return nil
}

// TestImpostorPeer: a host process with a self-signed certificate that
// claims B's identity sits at B's first endpoint and asks A for data. A
// refuses it as a client and never sends it anything as a server;
// replication to the real B goes on over B's other endpoint.
func TestImpostorPeer(t *testing.T) {
	ctx, hb, a, b, hc := twinPair(t, 15*time.Minute)

	// The impostor: self-signed, with B's appliance name.
	self, err := pki.NewRootCA(b.id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := pki.NewKey()
	leaf, _ := self.Leaf(b.id, []string{b.id + identity.DNSSuffix, "127.0.0.1"}, &key.PublicKey, time.Hour)
	impostorCert := pki.TLSCertificate(leaf, key, self.Cert)
	var handshakes, requests atomic.Int64
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			requests.Add(1)
			io.Copy(io.Discard, r.Body)
		}),
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{impostorCert}, ClientAuth: tls.RequestClientCert},
		ConnState: func(_ net.Conn, s http.ConnState) {
			if s == http.StateNew {
				handshakes.Add(1)
			}
		},
		ErrorLog: log.New(io.Discard, "", 0),
	}
	go srv.ServeTLS(ln, "", "")
	defer srv.Close()
	impostorPort := ln.Addr().(*net.TCPAddr).Port

	// Someone re-points B's first endpoint at the impostor (put back for
	// the next scenario on the shared pair).
	t.Cleanup(func() {
		for _, br := range hb.b {
			br.SetEndpoints(hb.op(br), b.id, b.endpoints())
		}
	})
	for _, br := range hb.b {
		if err := br.SetEndpoints(hb.op(br), b.id, []string{fmt.Sprintf("%s:%d", hostAlias(0), impostorPort), b.endpoints()[1]}); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := a.v.WaitFor(ctx, 0, func(s string) bool {
		return bootreport.JSONMsg(s) == "replication peer added" && strings.Contains(s, fmt.Sprint(impostorPort))
	}); err != nil {
		t.Fatal(err)
	}
	ra := newResticClient(t, a.ports[0], "population-registry")
	initRepo(t, ra)
	mustRestic(t, ra, "backup", randomTree(t, 2, 4<<20))
	waitConverged(t, ctx, hc, a, b)
	if handshakes.Load() == 0 {
		t.Fatal("A never tried the impostor's endpoint; the test proves nothing")
	}
	if n := requests.Load(); n != 0 {
		t.Fatalf("the impostor received %d requests", n)
	}

	// The impostor as a client of A's replication service.
	cl := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		InsecureSkipVerify: true, Certificates: []tls.Certificate{impostorCert}}}}
	objs, _ := repoObjects(hc, a.ports[0])
	var someData string
	for k := range objs {
		if strings.HasPrefix(k, "data/") {
			someData = strings.TrimPrefix(k, "data/")
		}
	}
	for _, target := range []string{replicate.PathNamespaces, replicate.PathList + "?ns=population/data",
		replicate.PathObject + "?ns=population/data&name=" + someData} {
		resp, err := cl.Get(fmt.Sprintf("https://127.0.0.1:%d%s", a.ports[0], target))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized || strings.Contains(string(body), someData[:16]) || strings.Contains(string(body), "population/") {
			t.Fatalf("%s: impostor got %s: %.200s", target, resp.Status, body)
		}
	}
	if _, _, err := a.v.WaitFor(ctx, 0, func(s string) bool { return bootreport.JSONMsg(s) == "replication peer refused" }); err != nil {
		t.Fatal(err)
	}
}

// TestPeerDownCatchUp: B is off while 200 MiB are backed up into A; A
// reports the lag; B, started again, catches up to zero lag with no
// operator action.
func TestPeerDownCatchUp(t *testing.T) {
	parallelScenario(t, 2, 190*time.Second)
	ctx, hb, a, b, hc := twinDrill(t, 15*time.Minute)
	ra := newResticClient(t, a.ports[0], "population-registry")
	mustRestic(t, ra, "init")
	waitConverged(t, ctx, hc, a, b)

	b.v.Close()
	src := randomTree(t, 25, 8<<20)
	mustRestic(t, ra, "backup", src)
	h := waitHealth(t, ctx, func() (*api.Health, error) { return health(hc, a.ports[0]) }, "A reports its lag to B",
		func(h *api.Health) bool { return len(h.Peers) == 1 && h.Peers[0].PendingBytes >= 200<<20 })
	lag := h.Peers[0]
	t.Logf("lag while B is down: %d objects, %d bytes, oldest %.0fs", lag.PendingObjects, lag.PendingBytes, lag.OldestSeconds)
	// Operators see it too, with the next attestation.
	waitHealth(t, ctx, func() (*api.Health, error) { return applianceHealth(ctx, hb, a.id), nil }, "embassyctl status shows A's lag",
		func(h *api.Health) bool {
			return h != nil && len(h.Peers) == 1 && h.Peers[0].ID == b.id && h.Peers[0].PendingObjects > 0
		})

	start := time.Now()
	b.restart(t)
	waitMsg(t, ctx, b.v, 0, logmsg.MsgServing)
	waitConverged(t, ctx, hc, a, b)
	waitZeroLag(t, ctx, hc, a)
	t.Logf("B caught up %d MiB in %.1fs after its restart", lag.PendingBytes>>20, time.Since(start).Seconds())
	rb := newResticClient(t, b.ports[0], "population-registry")
	mustRestic(t, rb, "check", "--read-data")
}

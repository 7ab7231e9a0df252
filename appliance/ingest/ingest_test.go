package ingest_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/ingest"
	"github.com/dataembassy/embassy/appliance/store"
	"github.com/dataembassy/embassy/broker/pki"
)

type fixture struct {
	url       string
	roots     []string // store disk roots
	serverCA  string   // PEM path
	clientPEM string   // writer's cert+key PEM
	readerPEM string
	otherPEM  string // from a foreign CA
	srvCAPool *x509.CertPool
	certs     map[string]tls.Certificate
	srv       *ingest.Server
	stored    *storedLog // every object the server reported durable
}

// storedLog records the server's OnStored calls: which objects each
// upload made durable, counted per namespace ("population/data").
type storedLog struct {
	mu      sync.Mutex
	objects map[string]map[string]int // ns -> name -> times stored
}

func (l *storedLog) record(ns, name string, size int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.objects[ns] == nil {
		l.objects[ns] = map[string]int{}
	}
	l.objects[ns][name]++
}

// uploads returns how many uploads of ns the server has stored so far.
func (l *storedLog) uploads(ns string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, c := range l.objects[ns] {
		n += c
	}
	return n
}

// all returns every stored object as "ns/name".
func (l *storedLog) all() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for ns, names := range l.objects {
		for name := range names {
			out = append(out, ns+"/"+name)
		}
	}
	return out
}

func clientPEM(t testing.TB, dir, name string, ca *pki.Issuer) (string, tls.Certificate) {
	t.Helper()
	key, _ := pki.NewKey()
	leaf, err := ca.Leaf(name, nil, &key.PublicKey, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKCS8PrivateKey(key)
	p := filepath.Join(dir, name+".pem")
	b := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Raw}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})...)
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p, pki.TLSCertificate(leaf, key)
}

func start(t testing.TB, opts ...func(*ingest.Server)) *fixture {
	t.Helper()
	dir := t.TempDir()
	f := &fixture{certs: map[string]tls.Certificate{}}
	srvCA, _ := pki.NewRootCA("broker CA", time.Hour)
	clientCA, _ := pki.NewRootCA("home-state client CA", time.Hour)
	foreign, _ := pki.NewRootCA("someone else", time.Hour)
	srvKey, _ := pki.NewKey()
	srvLeaf, _ := srvCA.Leaf("appliance", []string{"127.0.0.1"}, &srvKey.PublicKey, time.Hour)
	f.serverCA = filepath.Join(dir, "server-ca.pem")
	os.WriteFile(f.serverCA, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srvCA.Cert.Raw}), 0o644)
	f.srvCAPool = srvCA.Pool()
	var c tls.Certificate
	f.clientPEM, c = clientPEM(t, dir, "population-registry", clientCA)
	f.certs["writer"] = c
	f.readerPEM, c = clientPEM(t, dir, "auditor", clientCA)
	f.certs["reader"] = c
	f.otherPEM, c = clientPEM(t, dir, "population-registry-forged", foreign)
	f.certs["foreign"] = c

	for i := 0; i < 2; i++ {
		f.roots = append(f.roots, filepath.Join(dir, fmt.Sprintf("disk%d", i)))
	}
	st, err := store.Open(slog.New(slog.NewTextHandler(io.Discard, nil)), []store.DiskSpec{{ID: "a", Root: f.roots[0]}, {ID: "b", Root: f.roots[1]}})
	if err != nil {
		t.Fatal(err)
	}
	srv := &ingest.Server{Store: st, ClientCAs: clientCA.Pool(), MaxObject: 32 << 20,
		Auth: ingest.Rules{"population": {Writers: []string{"population-registry"}, Readers: []string{"auditor"}}}}
	f.stored = &storedLog{objects: map[string]map[string]int{}}
	srv.OnStored = f.stored.record
	for _, o := range opts {
		o(srv)
	}
	f.srv = srv
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: srv, TLSConfig: &tls.Config{Certificates: []tls.Certificate{pki.TLSCertificate(srvLeaf, srvKey)},
		ClientAuth: tls.RequestClientCert, MinVersion: tls.VersionTLS12}}
	go hs.ServeTLS(ln, "", "")
	t.Cleanup(func() { hs.Close() })
	f.url = "https://" + ln.Addr().String()
	return f
}

func needRestic(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("restic"); err != nil {
		t.Skip("restic not installed (make deps installs it)")
	}
}

func (f *fixture) restic(t testing.TB, certPEM string, args ...string) (string, error) {
	t.Helper()
	return f.resticIn(t, "", certPEM, args...)
}

// resticIn runs restic in the working directory dir ("" for the current).
func (f *fixture) resticIn(t testing.TB, dir, certPEM string, args ...string) (string, error) {
	t.Helper()
	full := append([]string{"-r", "rest:" + f.url + "/population/", "--cacert", f.serverCA, "--tls-client-cert", certPEM, "--no-cache"}, args...)
	cmd := exec.Command("restic", full...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "RESTIC_PASSWORD=correct horse battery staple")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// sampleTree writes a tree of random and repeated files.
func sampleTree(t *testing.T, mib int) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "register")
	for i := 0; i < mib; i++ {
		sub := filepath.Join(dir, fmt.Sprintf("part%02d", i%4))
		os.MkdirAll(sub, 0o755)
		b := make([]byte, 1<<20)
		rand.Read(b)
		os.WriteFile(filepath.Join(sub, fmt.Sprintf("record-%03d.bin", i)), b, 0o644)
		os.WriteFile(filepath.Join(sub, fmt.Sprintf("record-%03d.copy", i)), b, 0o644) // dedup
	}
	os.WriteFile(filepath.Join(dir, "README.txt"), []byte("population register extract\n"), 0o644)
	return dir
}

// backupSummary is the summary line of `restic backup --json`.
type backupSummary struct {
	MessageType     string `json:"message_type"`
	FilesNew        int    `json:"files_new"`
	FilesChanged    int    `json:"files_changed"`
	FilesUnmodified int    `json:"files_unmodified"`
	DataBlobs       int    `json:"data_blobs"`
	TreeBlobs       int    `json:"tree_blobs"`
	DataAdded       int64  `json:"data_added"`
	SnapshotID      string `json:"snapshot_id"`
}

// backup runs `restic backup --json` of src, named relative to its parent
// directory so that the snapshot's trees hold src alone (not /tmp and its
// ever-changing metadata), and returns the summary.
func (f *fixture) backup(t *testing.T, src string) backupSummary {
	t.Helper()
	out, err := f.resticIn(t, filepath.Dir(src), f.clientPEM, "backup", "--json", filepath.Base(src))
	if err != nil {
		t.Fatalf("backup: %v\n%s", err, out)
	}
	for _, line := range strings.Split(out, "\n") {
		var s backupSummary
		if json.Unmarshal([]byte(line), &s) == nil && s.MessageType == "summary" {
			return s
		}
	}
	t.Fatalf("backup printed no JSON summary:\n%s", out)
	return backupSummary{}
}

func countFiles(t *testing.T, dir string) int {
	t.Helper()
	n := 0
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			n++
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// diskObjects reads every object file under a store disk root, keyed by
// its path below the root, and checks that each hashes to its name: a
// content-addressed object to its file name, a named one ("config~<sha256>")
// to the digest in its file name.
func diskObjects(t *testing.T, root string) map[string][]byte {
	t.Helper()
	objs := map[string][]byte{}
	err := filepath.WalkDir(filepath.Join(root, "objects"), func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		want := d.Name()
		if i := strings.LastIndex(want, "~"); i >= 0 {
			want = want[i+1:]
		}
		if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != want {
			t.Errorf("%s on %s hashes to %x, not to its name", rel, root, sum)
		}
		objs[rel] = b
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

// assertMirrored checks that both disks hold exactly the same object files
// with byte-identical content that hashes to their names, and that every
// object the server reported stored is among them (locks excepted: restic
// deletes its locks, the one deletion the server allows).
func assertMirrored(t *testing.T, f *fixture) {
	t.Helper()
	a, b := diskObjects(t, f.roots[0]), diskObjects(t, f.roots[1])
	for rel, ab := range a {
		bb, ok := b[rel]
		switch {
		case !ok:
			t.Errorf("%s is on %s only", rel, f.roots[0])
		case !bytes.Equal(ab, bb):
			t.Errorf("%s differs between the disks", rel)
		}
	}
	for rel := range b {
		if _, ok := a[rel]; !ok {
			t.Errorf("%s is on %s only", rel, f.roots[1])
		}
	}
	for _, obj := range f.stored.all() {
		ns, name := filepath.Dir(obj), filepath.Base(obj)
		if filepath.Base(ns) == "locks" {
			continue
		}
		p := filepath.Join("objects", ns, "named", name+"~")
		if len(name) == 64 {
			p = filepath.Join("objects", ns, name[:2], name)
		}
		found := false
		for rel := range a {
			if rel == p || strings.HasPrefix(rel, p) && strings.HasSuffix(p, "~") {
				found = true
			}
		}
		if !found {
			t.Errorf("stored object %s is not on the disks", obj)
		}
	}
	if f.stored.uploads("population/data") == 0 || len(a) == 0 {
		t.Fatalf("no data packs stored (%d files on disk)", len(a))
	}
}

func TestResticBackupCheckRestore(t *testing.T) {
	needRestic(t)
	f := start(t)
	src := sampleTree(t, 8)
	files := countFiles(t, src)
	if out, err := f.restic(t, f.clientPEM, "init"); err != nil {
		t.Fatalf("init: %v\n%s", err, out)
	}
	first := f.backup(t, src)
	firstPacks := f.stored.uploads("population/data")
	if first.FilesNew != files || first.DataBlobs == 0 || first.DataAdded < 8<<20 || firstPacks == 0 {
		t.Fatalf("first backup: %+v with %d data packs stored, want all %d files new and at least 8 MiB of data in packs", first, firstPacks, files)
	}
	// The second backup of the same tree is deduplicated: every file is
	// unmodified, no blob is new, and no data pack reaches the server.
	second := f.backup(t, src)
	if second.FilesNew != 0 || second.FilesChanged != 0 || second.FilesUnmodified != files ||
		second.DataBlobs != 0 || second.TreeBlobs != 0 || second.DataAdded != 0 {
		t.Fatalf("second backup not deduplicated: %+v, want all %d files unmodified and nothing added", second, files)
	}
	if n := f.stored.uploads("population/data") - firstPacks; n != 0 {
		t.Fatalf("second backup uploaded %d data packs, want none", n)
	}
	if second.SnapshotID == "" || second.SnapshotID == first.SnapshotID || f.stored.uploads("population/snapshots") != 2 {
		t.Fatalf("second backup made no new snapshot: %q after %q, %d snapshots stored", second.SnapshotID, first.SnapshotID, f.stored.uploads("population/snapshots"))
	}
	if out, err := f.restic(t, f.clientPEM, "check", "--read-data"); err != nil {
		t.Fatalf("check: %v\n%s", err, out)
	}
	// A reader may restore; the restored tree equals the source.
	dst := t.TempDir()
	if out, err := f.restic(t, f.readerPEM, "restore", "latest", "--target", dst); err != nil {
		t.Fatalf("restore: %v\n%s", err, out)
	}
	if out, err := exec.Command("diff", "-r", src, filepath.Join(dst, filepath.Base(src))).CombinedOutput(); err != nil {
		t.Fatalf("restored tree differs: %v\n%s", err, out)
	}
	// (Refused deletes and a reader's uploads are checked over raw HTTP in
	// TestBadRequests: restic retries refused requests for minutes.)
	// Every object is mirrored on both disks, byte for byte.
	assertMirrored(t, f)
	if out, err := f.restic(t, f.clientPEM, "check"); err != nil {
		t.Fatalf("check after refused requests: %v\n%s", err, out)
	}
}

func TestBadRequests(t *testing.T) {
	f := start(t)
	client := func(cert string) *http.Client {
		tc := &tls.Config{RootCAs: f.srvCAPool}
		if cert != "" {
			tc.Certificates = []tls.Certificate{f.certs[cert]}
		}
		return &http.Client{Transport: &http.Transport{TLSClientConfig: tc}}
	}
	body := []byte("some pack")
	sum := sha256.Sum256(body)
	name := hex.EncodeToString(sum[:])
	bigLock := bytes.Repeat([]byte("l"), ingest.MaxLockSize+1)
	bigSum := sha256.Sum256(bigLock)
	bigLockName := hex.EncodeToString(bigSum[:])
	do := func(c *http.Client, method, path string, b []byte) (int, string) {
		req, _ := http.NewRequest(method, f.url+path, bytes.NewReader(b))
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		msg, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(msg)
	}
	w := client("writer")
	if code, msg := do(w, "POST", "/population/data/"+name, body); code != 200 {
		t.Fatalf("good upload: %d %s", code, msg)
	}
	cases := []struct {
		name   string
		c      *http.Client
		method string
		path   string
		body   []byte
		status int
		msg    string
	}{
		{"no client certificate", client(""), "GET", "/population/data/", nil, 401, "client certificate"},
		{"foreign client certificate", client("foreign"), "GET", "/population/data/", nil, 401, "not from the home-state client CA"},
		{"other repository", w, "GET", "/cadastre/data/", nil, 403, "may not read"},
		{"path traversal", w, "GET", "/population/../cadastre/config", nil, 400, "traversal"},
		{"encoded traversal", w, "GET", "/population/data/%2e%2e", nil, 400, ""},
		{"unknown type", w, "GET", "/population/secrets/", nil, 404, "unknown object type"},
		{"bad object name", w, "GET", "/population/data/xyz", nil, 400, "not a SHA-256"},
		{"wrong hash", w, "POST", "/population/data/" + strings.Repeat("ab", 32), body, 400, "SHA-256"},
		{"oversized body", w, "POST", "/population/data/" + strings.Repeat("cd", 32), make([]byte, 33<<20), 413, "exceeds"},
		{"delete data", w, "DELETE", "/population/data/" + name, nil, 403, "append-only"},
		{"delete snapshot", w, "DELETE", "/population/snapshots/" + name, nil, 403, "append-only"},
		{"reader uploads", client("reader"), "POST", "/population/data/" + name, body, 403, "may not append"},
		{"reader reads", client("reader"), "GET", "/population/data/" + name, nil, 200, "some pack"},
		{"delete repository", w, "DELETE", "/population/", nil, 403, "append-only"},
		{"overwrite config", w, "POST", "/population/config", []byte("v1"), 200, ""},
		{"overwrite config with other bytes", w, "POST", "/population/config", []byte("v2"), 403, "different content"},
		{"missing object", w, "GET", "/population/data/" + strings.Repeat("ef", 32), nil, 404, ""},
		{"oversized lock", client("reader"), "POST", "/population/locks/" + bigLockName, bigLock, 413, "exceeds"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, msg := do(c.c, c.method, c.path, c.body)
			if code != c.status || !strings.Contains(msg, c.msg) {
				t.Fatalf("got %d %q, want %d with %q", code, msg, c.status, c.msg)
			}
		})
	}
	// Nothing changed: the one good object is still listed, and intact.
	req, _ := http.NewRequest("GET", f.url+"/population/data/", nil)
	req.Header.Set("Accept", "application/vnd.x.restic.rest.v2")
	resp, err := w.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	list, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if want := fmt.Sprintf(`[{"name":"%s","size":%d}]`, name, len(body)); strings.TrimSpace(string(list)) != want {
		t.Fatalf("list %s, want %s", list, want)
	}
	if code, msg := do(w, "GET", "/population/data/"+name, nil); code != 200 || msg != string(body) {
		t.Fatalf("object changed: %d %q", code, msg)
	}
}

// TestLocksBounded: readers may take locks, so locks are bounded in number
// per repository (429 past the bound, until one is removed) besides their
// size.
func TestLocksBounded(t *testing.T) {
	f := start(t, func(s *ingest.Server) { s.MaxLocks = 3 })
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: f.srvCAPool, Certificates: []tls.Certificate{f.certs["reader"]}}}}
	lock := func(method string, i int) int {
		b := []byte(fmt.Sprintf("lock %d", i))
		sum := sha256.Sum256(b)
		req, _ := http.NewRequest(method, f.url+"/population/locks/"+hex.EncodeToString(sum[:]), bytes.NewReader(b))
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for i, tc := range []struct {
		method string
		lock   int
		want   int
	}{
		{"POST", 0, 200}, {"POST", 1, 200}, {"POST", 2, 200},
		{"POST", 3, http.StatusTooManyRequests},
		{"DELETE", 0, 200},
		{"POST", 3, 200},
		{"POST", 4, http.StatusTooManyRequests},
	} {
		if got := lock(tc.method, tc.lock); got != tc.want {
			t.Fatalf("step %d: %s lock %d answered %d, want %d", i, tc.method, tc.lock, got, tc.want)
		}
	}
}

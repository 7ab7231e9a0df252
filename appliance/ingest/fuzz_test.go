package ingest_test

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/ingest"
	"github.com/dataembassy/embassy/appliance/objectio"
	"github.com/dataembassy/embassy/appliance/objref"
	"github.com/dataembassy/embassy/appliance/store"
	"github.com/dataembassy/embassy/broker/pki"
)

// shaPlaceholder in a fuzzed path is replaced by the SHA-256 of the body,
// so that uploads with the right name (and so the store's write path) are
// reached as often as wrong ones.
const shaPlaceholder = "{sha}"

// fuzzServer is an ingest server over a two-disk store in a temporary
// folder, with a small upload budget, and the certificate chains of a
// writer and a reader of the "population" repository.
type fuzzServer struct {
	dir            string // holds the disks and nothing else
	roots          []string
	store          *store.Store
	srv            *ingest.Server
	budget         *objectio.Budget
	writer, reader []*x509.Certificate
}

const (
	fuzzMaxObject = 16 << 10
	fuzzBudget    = 2 * fuzzMaxObject
)

func newFuzzServer(t testing.TB) *fuzzServer {
	t.Helper()
	clientCA, err := pki.NewRootCA("home-state client CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	leaf := func(name string) []*x509.Certificate {
		key, _ := pki.NewKey()
		c, err := clientCA.Leaf(name, nil, &key.PublicKey, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		return []*x509.Certificate{c}
	}
	s := &fuzzServer{dir: t.TempDir(), writer: leaf("population-registry"), reader: leaf("auditor")}
	specs := []store.DiskSpec{}
	for _, id := range []string{"a", "b"} {
		root := filepath.Join(s.dir, "disk-"+id)
		s.roots = append(s.roots, root)
		specs = append(specs, store.DiskSpec{ID: id, Root: root})
	}
	if s.store, err = store.Open(slog.New(slog.NewTextHandler(io.Discard, nil)), specs); err != nil {
		t.Fatal(err)
	}
	s.budget = objectio.NewBudget(fuzzBudget)
	s.srv = &ingest.Server{Store: s.store, ClientCAs: clientCA.Pool(), MaxObject: fuzzMaxObject, Budget: s.budget, MaxLocks: 8,
		Auth: ingest.Rules{"population": {Writers: []string{"population-registry"}, Readers: []string{"auditor"}}}}
	// Objects to read, list, conflict with and delete.
	for _, o := range []struct{ ns, name, data string }{
		{"population/config", "config", "repository config"},
		{"population/data", objref.Digest([]byte("pack")), "pack"},
		{"population/locks", objref.Digest([]byte("lock")), "lock"},
	} {
		if _, err := s.store.Put(o.ns, o.name, []byte(o.data)); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

// files lists every file and folder under the server's folder.
func (s *fuzzServer) files(t testing.TB) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	err := filepath.WalkDir(s.dir, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		out[p] = true
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// FuzzServeHTTP sends arbitrary methods, paths and bodies, of known or
// unknown length, as the repository's writer or reader, with some of the
// upload budget taken, to the real handler over a real store. It proves
// that the server never panics; never answers 5xx but the 503 of a spent
// upload budget (with its Retry-After); creates files only for an
// accepted request, and only inside the disks' folder of the repository
// and type the path names (so no path, however malformed, writes outside
// it, and nothing is left in the disks' temp folders); and never stores an
// object under a content-addressed name its body does not hash to.
func FuzzServeHTTP(f *testing.F) {
	fz := newFuzzServer(f)
	pack := objref.Digest([]byte("pack"))
	for _, s := range []struct {
		method, path, body string
		chunked, reader    bool
		held               uint16
	}{
		{"POST", "/population/data/" + shaPlaceholder, "new pack", false, false, 0},
		{"POST", "/population/data/" + shaPlaceholder, "new pack", true, false, 0},
		{"POST", "/population/data/" + pack, "not the pack", false, false, 0},
		{"POST", "/population/config", "another config", false, false, 0},
		{"POST", "/population/locks/" + shaPlaceholder, "my lock", false, true, 0},
		{"DELETE", "/population/locks/" + objref.Digest([]byte("lock")), "", false, true, 0},
		{"GET", "/population/data/" + pack, "", false, true, 0},
		{"HEAD", "/population/config", "", false, false, 0},
		{"GET", "/population/keys/", "", false, false, 0},
		{"POST", "/population/?create=true", "", false, false, 0},
		{"POST", "/population/data/" + shaPlaceholder, "busy", false, false, fuzzBudget},
		{"POST", "/../population/data/" + shaPlaceholder, "escape", false, false, 0},
		{"POST", "/population/data/../../../x", "escape", false, false, 0},
	} {
		f.Add(s.method, s.path, []byte(s.body), s.chunked, s.reader, s.held)
	}
	f.Fuzz(func(t *testing.T, method, path string, body []byte, chunked, asReader bool, held uint16) {
		path = strings.ReplaceAll(path, shaPlaceholder, objref.Digest(body))
		path, query, _ := strings.Cut(path, "?")
		req := httptest.NewRequest(http.MethodGet, "/", bytes.NewReader(body))
		req.Method, req.URL.Path, req.URL.RawQuery = method, path, query
		if chunked {
			req.ContentLength = -1
		}
		chain := fz.writer
		if asReader {
			chain = fz.reader
		}
		req.TLS = &tls.ConnectionState{PeerCertificates: chain}

		// What the path names, read here independently of the handler.
		parts := strings.Split(strings.TrimPrefix(path, "/"), "/")
		var ns, name string
		if len(parts) >= 2 && objref.CheckRepo(parts[0]) == nil && objref.CheckType(parts[1]) == nil {
			ns = objref.Namespace(parts[0], parts[1])
		}
		if len(parts) == 3 {
			name = parts[2]
		}
		wrongHash := ns != "" && objref.ContentAddressed(name) && name != objref.Digest(body)
		var hadObject bool
		if wrongHash {
			_, hadObject = fz.store.Has(ns, name)
		}
		before := fz.files(t)

		release, err := fz.budget.Reserve(int64(held) % (fuzzBudget + 1))
		if err != nil {
			t.Fatal(err)
		}
		rec := httptest.NewRecorder()
		fz.srv.ServeHTTP(rec, req)
		release()

		status := rec.Code
		if status >= 500 && (status != http.StatusServiceUnavailable || rec.Header().Get("Retry-After") == "") {
			t.Fatalf("%s %q: status %d: %s", method, path, status, rec.Body)
		}
		accepted := status < 300
		for p := range fz.files(t) {
			if before[p] {
				continue
			}
			if !accepted {
				t.Fatalf("%s %q refused with %d but created %s", method, path, status, p)
			}
			inside := false
			for _, root := range fz.roots {
				nsDir := filepath.Join(root, "objects", ns)
				if ns != "" && (p == filepath.Dir(nsDir) || p == nsDir || strings.HasPrefix(p, nsDir+string(filepath.Separator))) {
					inside = true
				}
			}
			if !inside {
				t.Fatalf("%s %q created %s, outside the folder of its repository and type", method, path, p)
			}
		}
		if wrongHash && !hadObject {
			if _, has := fz.store.Has(ns, name); has {
				t.Fatalf("%s %q stored a body that does not hash to its name (status %d)", method, path, status)
			}
		}
		if wrongHash && method == http.MethodPost && accepted {
			t.Fatalf("upload of a body that does not hash to %s accepted", name)
		}
	})
}

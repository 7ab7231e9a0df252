// Package ingest serves the restic REST backend protocol (v1 and v2) on
// top of the mirrored object store, append-only: objects can be created but
// never changed, and only locks can be deleted. Every upload is verified
// against its SHA-256 name and is durable on every healthy disk before it
// is acknowledged. Clients authenticate with home-state client
// certificates (mutual TLS); an Authorizer decides which client may read
// or append to which repository.
package ingest

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"

	"github.com/dataembassy/embassy/appliance/httperr"
	"github.com/dataembassy/embassy/appliance/objectio"
	"github.com/dataembassy/embassy/appliance/objref"
	"github.com/dataembassy/embassy/appliance/store"
	"github.com/prometheus/client_golang/prometheus"
)

// MsgStored is logged for every acknowledged object (after it is durable on
// every healthy disk, before the client hears 200).
const MsgStored = "object stored"

// Store is what the server needs of the object store.
type Store interface {
	Put(ns, name string, data []byte) ([]string, error)
	Get(ns, name string) ([]byte, error)
	Has(ns, name string) (int64, bool)
	List(ns string) ([]store.ObjectInfo, error)
	Delete(ns, name string) error
}

// Authorizer decides access for an authenticated client.
type Authorizer interface {
	// Allowed reports whether client may read (write=false) or append
	// (write=true) to repo.
	Allowed(client, repo string, write bool) bool
}

// Server is the REST handler. Serve it with a tls.Config that requests
// client certificates (tls.RequestClientCert); the handler verifies them
// against ClientCAs so that a missing or foreign certificate gets a clear
// HTTP 401 rather than a failed handshake.
type Server struct {
	Store     Store
	Auth      Authorizer
	ClientCAs *x509.CertPool
	Log       *slog.Logger
	MaxObject int64
	// Budget bounds the bytes of uploads in memory (shared with the
	// replication service); nil bounds nothing.
	Budget *objectio.Budget
	// MaxLocks bounds the locks of one repository (DefaultMaxLocks when
	// 0): readers may take locks, and nothing else bounds them.
	MaxLocks int
	// OnStored, if set, is told of every object once it is durable (the
	// replicator queues it for the peers). It must not block.
	OnStored func(ns, name string, size int64)

	metricsOnce sync.Once
	metrics     *metrics
}

const mimeV2 = "application/vnd.x.restic.rest.v2"

func fail(status int, format string, args ...any) error {
	return httperr.New(status, format, args...)
}

// route splits /<repo>/<type>/<name> (name optional), or /<repo>/config,
// or /<repo>/ (repository root).
type route struct {
	repo, typ, name string
}

// ref is the object a route names.
func (rt route) ref() objref.Ref {
	if rt.typ == objref.TypeConfig {
		return objref.Ref{Repo: rt.repo, Type: objref.TypeConfig, Name: objref.ConfigName}
	}
	return objref.Ref{Repo: rt.repo, Type: rt.typ, Name: rt.name}
}

func parse(path string) (route, error) {
	if strings.Contains(path, "//") || strings.Contains(path, "\\") {
		return route{}, fail(http.StatusBadRequest, "malformed path %q", path)
	}
	parts := strings.Split(strings.TrimPrefix(path, "/"), "/")
	for _, p := range parts {
		if p == "." || p == ".." {
			return route{}, fail(http.StatusBadRequest, "path traversal in %q", path)
		}
	}
	if len(parts) == 0 || objref.CheckRepo(parts[0]) != nil {
		return route{}, fail(http.StatusNotFound, "no repository in %q", path)
	}
	r := route{repo: parts[0]}
	switch {
	case len(parts) == 1 || (len(parts) == 2 && parts[1] == ""):
		return r, nil
	case len(parts) == 2 && parts[1] == objref.TypeConfig:
		r.typ = objref.TypeConfig
		return r, nil
	case len(parts) == 2 || (len(parts) == 3 && parts[2] == ""):
		r.typ = parts[1]
	case len(parts) == 3:
		r.typ, r.name = parts[1], parts[2]
		if !objref.ContentAddressed(r.name) {
			return route{}, fail(http.StatusBadRequest, "object name %q is not a SHA-256", r.name)
		}
	default:
		return route{}, fail(http.StatusNotFound, "no such path %q", path)
	}
	// The config is reached at /<repo>/config only.
	if r.typ == objref.TypeConfig || objref.CheckType(r.typ) != nil {
		return route{}, fail(http.StatusNotFound, "unknown object type %q", r.typ)
	}
	return r, nil
}

// ClientName verifies the request's client certificate against the
// home-state client CAs and returns its common name.
func (s *Server) ClientName(r *http.Request) (string, error) {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		return "", fail(http.StatusUnauthorized, "a client certificate from the home-state client CA is required")
	}
	inter := x509.NewCertPool()
	for _, c := range r.TLS.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	leaf := r.TLS.PeerCertificates[0]
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: s.ClientCAs, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return "", fail(http.StatusUnauthorized, "client certificate %q is not from the home-state client CA: %v", leaf.Subject.CommonName, err)
	}
	cn := leaf.Subject.CommonName
	if cn == "" {
		return "", fail(http.StatusUnauthorized, "client certificate has no common name")
	}
	return cn, nil
}

// ServeHTTP implements the restic REST protocol.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	m := s.counters()
	m.requests.Inc()
	defer prometheus.NewTimer(m.duration).ObserveDuration()
	err := s.serve(w, r)
	if err == nil {
		return
	}
	m.rejected.Inc()
	status := httperr.Status(err, http.StatusForbidden)
	if s.Log != nil {
		level := slog.LevelWarn
		if status == http.StatusNotFound {
			level = slog.LevelDebug // restic probes for objects that do not exist yet
		}
		s.Log.Log(r.Context(), level, "ingest request refused", "method", r.Method, "path", r.URL.Path, "status", status, "err", err.Error())
	}
	httperr.Write(w, err, status)
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) error {
	client, err := s.ClientName(r)
	if err != nil {
		return err
	}
	rt, err := parse(r.URL.Path)
	if err != nil {
		return err
	}
	// Readers take and release locks too (restic locks a repository to read
	// it); everything else that changes the repository needs a writer.
	write := (r.Method == http.MethodPost || r.Method == http.MethodDelete) && rt.typ != objref.TypeLocks
	if !s.Auth.Allowed(client, rt.repo, write) {
		return fail(http.StatusForbidden, "client %q may not %s repository %q", client, map[bool]string{false: "read", true: "append to"}[write], rt.repo)
	}
	switch {
	case rt.typ == "":
		if r.Method == http.MethodPost && r.URL.Query().Get("create") == "true" {
			// Object namespaces are created on first write.
			return nil
		}
		if r.Method == http.MethodDelete {
			return fail(http.StatusForbidden, "append-only: a repository cannot be deleted")
		}
		return fail(http.StatusMethodNotAllowed, "%s on a repository root", r.Method)
	case rt.name == "" && rt.typ != objref.TypeConfig:
		if r.Method != http.MethodGet {
			return fail(http.StatusMethodNotAllowed, "%s on a list", r.Method)
		}
		return s.list(w, r, rt)
	}
	ref := rt.ref()
	ns, name := ref.Namespace(), ref.Name
	switch r.Method {
	case http.MethodHead:
		size, ok := s.Store.Has(ns, name)
		if !ok {
			return fail(http.StatusNotFound, "%s not found", r.URL.Path)
		}
		w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
		return nil
	case http.MethodGet:
		return s.get(w, r, ns, name)
	case http.MethodPost:
		return s.put(w, r, ns, name, rt.typ == objref.TypeLocks)
	case http.MethodDelete:
		if rt.typ != objref.TypeLocks {
			return fail(http.StatusForbidden, "append-only: only locks can be deleted")
		}
		return s.Store.Delete(ns, name)
	}
	return fail(http.StatusMethodNotAllowed, "method %s", r.Method)
}

func (s *Server) list(w http.ResponseWriter, r *http.Request, rt route) error {
	objs, err := s.Store.List(objref.Namespace(rt.repo, rt.typ))
	if err != nil {
		return err
	}
	if r.Header.Get("Accept") == mimeV2 {
		type entry struct {
			Name string `json:"name"`
			Size int64  `json:"size"`
		}
		out := make([]entry, 0, len(objs))
		for _, o := range objs {
			out = append(out, entry{o.Name, o.Size})
		}
		w.Header().Set("Content-Type", mimeV2)
		return json.NewEncoder(w).Encode(out)
	}
	names := make([]string, 0, len(objs))
	for _, o := range objs {
		names = append(names, o.Name)
	}
	w.Header().Set("Content-Type", "application/vnd.x.restic.rest.v1")
	return json.NewEncoder(w).Encode(names)
}

func (s *Server) get(w http.ResponseWriter, r *http.Request, ns, name string) error {
	data, err := s.Store.Get(ns, name)
	if err != nil {
		return err
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	// ServeContent handles Range requests (restic reads parts of packs).
	http.ServeContent(w, r, "", zeroTime, bytes.NewReader(data))
	return nil
}

// Bounds on locks: restic's lock files are a few hundred bytes, and a
// repository rarely has more than a handful at once.
const (
	MaxLockSize     = 64 << 10
	DefaultMaxLocks = 1024
)

func (s *Server) put(w http.ResponseWriter, r *http.Request, ns, name string, lock bool) error {
	max := s.MaxObject
	if lock {
		max = MaxLockSize
		limit := s.MaxLocks
		if limit <= 0 {
			limit = DefaultMaxLocks
		}
		locks, err := s.Store.List(ns)
		if err != nil {
			return err
		}
		if len(locks) >= limit {
			return fail(http.StatusTooManyRequests, "repository holds %d locks, the most allowed; remove stale ones (restic unlock)", len(locks))
		}
	}
	data, release, err := objectio.ReadObject(r, max, s.Budget)
	if err != nil {
		return err
	}
	defer release()
	if _, err := s.Store.Put(ns, name, data); err != nil {
		return err
	}
	s.counters().bytesIn.Add(float64(len(data)))
	if s.Log != nil {
		s.Log.Info(MsgStored, "ns", ns, "name", name, "bytes", len(data))
	}
	if s.OnStored != nil {
		s.OnStored(ns, name, int64(len(data)))
	}
	return nil
}

// Package replicate keeps every repository of the appliance on its peers:
// the other appliances of the embassy, as k brokers list them after
// attestation. New objects are pushed as soon as they are stored; a
// periodic anti-entropy pass compares object lists per namespace and fills
// gaps in both directions. Both ends authenticate with the brokers'
// attested certificates. Every peer has one endpoint per network path; a
// failed path is left at once for the next one and probed in the
// background until it answers again.
//
// The wire protocol (HTTPS, on the ingest listener):
//
//	GET /_embassy/replica/v1/ping
//	GET /_embassy/replica/v1/namespaces            -> ["repo/type", ...]
//	GET /_embassy/replica/v1/list?ns=repo/type     -> [{"name":..,"size":..}]
//	GET /_embassy/replica/v1/object?ns=..&name=..  -> the object
//	PUT /_embassy/replica/v1/object?ns=..&name=..  <- the object
package replicate

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"time"

	"github.com/dataembassy/embassy/appliance/httperr"
	"github.com/dataembassy/embassy/appliance/objectio"
	"github.com/dataembassy/embassy/appliance/objref"
	"github.com/dataembassy/embassy/appliance/store"
	"github.com/dataembassy/embassy/protocol/identity"
)

// Paths of the replication protocol.
const (
	Prefix         = "/_embassy/replica/v1/"
	PathPing       = Prefix + "ping"
	PathNamespaces = Prefix + "namespaces"
	PathList       = Prefix + "list"
	PathObject     = Prefix + "object"
)

// Store is what replication needs of the object store.
type Store interface {
	Put(ns, name string, data []byte) ([]string, error)
	Get(ns, name string) ([]byte, error)
	Has(ns, name string) (int64, bool)
	List(ns string) ([]store.ObjectInfo, error)
	Namespaces() ([]string, error)
}

// Replicated reports whether a namespace is replicated. Locks are
// per-appliance and short-lived: restic takes them on the appliance it
// talks to, so they are not copied.
func Replicated(ns string) bool {
	_, typ, err := objref.ParseNamespace(ns)
	return err == nil && typ != objref.TypeLocks
}

// ListEntry is one object of a list answer.
type ListEntry struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
}

// Server answers peers. Serve it on a listener whose tls.Config requests
// client certificates; the handler checks them so a refusal is an HTTP
// answer and a log line rather than a failed handshake.
type Server struct {
	Store Store
	// IDs decides a client's identity: k brokers, each through its own
	// CA pinned in the image, must vouch for its key.
	IDs identity.Verifier
	// Allowed reports whether an attested appliance id is a current peer.
	Allowed   func(id string) bool
	Log       *slog.Logger
	MaxObject int64
	// Limit bounds concurrent object transfers (default 4).
	Limit int
	// Budget bounds the bytes of uploads in memory (shared with ingest);
	// nil bounds nothing.
	Budget *objectio.Budget
	Now    func() time.Time

	sem     chan struct{}
	metrics *serverMetrics
}

func refuse(status int, format string, args ...any) error {
	return httperr.New(status, format, args...)
}

// Peer returns the attested appliance id of the connection's client
// certificate, or an error if it is not a certificate the brokers issued.
func Peer(r *http.Request, ids identity.Verifier, now time.Time) (string, error) {
	if r.TLS == nil {
		return "", identity.ErrNoCertificate
	}
	got, err := ids.Verify(r.TLS.PeerCertificates, now, x509.ExtKeyUsageClientAuth)
	return got.ID, err
}

func (s *Server) now() time.Time {
	if s.Now != nil {
		return s.Now()
	}
	return time.Now()
}

// ServeHTTP serves the replication protocol.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	err := s.serve(w, r)
	if err == nil {
		return
	}
	status := httperr.Status(err, http.StatusConflict)
	if status == http.StatusUnauthorized || status == http.StatusForbidden {
		s.metrics.refused.Inc()
		s.Log.Warn("replication peer refused", "remote", r.RemoteAddr, "path", r.URL.Path, "reason", err.Error())
	} else if status >= 500 || status == http.StatusConflict {
		s.Log.Error("replication request failed", "remote", r.RemoteAddr, "path", r.URL.Path, "status", status, "err", err.Error())
	}
	httperr.Write(w, err, status)
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) error {
	if s.sem == nil {
		return errors.New("replication server not initialised; use Init")
	}
	id, err := Peer(r, s.IDs, s.now())
	if err != nil {
		return refuse(http.StatusUnauthorized, "replication needs an attested peer certificate: %v", err)
	}
	if s.Allowed == nil || !s.Allowed(id) {
		return refuse(http.StatusForbidden, "appliance %s is not a peer of this appliance", id)
	}
	q := r.URL.Query()
	switch r.URL.Path {
	case PathPing:
		w.WriteHeader(http.StatusNoContent)
		return nil
	case PathNamespaces:
		if r.Method != http.MethodGet {
			return refuse(http.StatusMethodNotAllowed, "use GET")
		}
		all, err := s.Store.Namespaces()
		if err != nil {
			return err
		}
		out := []string{}
		for _, ns := range all {
			if Replicated(ns) {
				out = append(out, ns)
			}
		}
		return writeJSON(w, out)
	case PathList:
		ns := q.Get("ns")
		if !Replicated(ns) {
			return refuse(http.StatusBadRequest, "namespace %q is not replicated", ns)
		}
		objs, err := s.Store.List(ns)
		if err != nil {
			return err
		}
		out := make([]ListEntry, 0, len(objs))
		for _, o := range objs {
			out = append(out, ListEntry{o.Name, o.Size})
		}
		return writeJSON(w, out)
	case PathObject:
		ns, name := q.Get("ns"), q.Get("name")
		if !Replicated(ns) {
			return refuse(http.StatusBadRequest, "namespace %q is not replicated", ns)
		}
		if _, err := objref.Parse(ns, name); err != nil {
			return err
		}
		switch r.Method {
		case http.MethodGet:
			data, err := s.Store.Get(ns, name)
			if err != nil {
				return err
			}
			w.Header().Set("Content-Type", "application/octet-stream")
			_, err = w.Write(data)
			return err
		case http.MethodPut:
			return s.put(r, id, ns, name)
		}
		return refuse(http.StatusMethodNotAllowed, "use GET or PUT")
	}
	return refuse(http.StatusNotFound, "no such replication path")
}

func (s *Server) put(r *http.Request, peer, ns, name string) error {
	select {
	case s.sem <- struct{}{}:
		defer func() { <-s.sem }()
	case <-r.Context().Done():
		return r.Context().Err()
	}
	data, release, err := objectio.ReadObject(r, s.MaxObject, s.Budget)
	if err != nil {
		return err
	}
	defer release()
	if _, err := s.Store.Put(ns, name, data); err != nil {
		return err
	}
	s.metrics.received.Inc()
	s.metrics.receivedBytes.Add(float64(len(data)))
	s.Log.Debug("replica stored", "peer", peer, "ns", ns, "name", name, "bytes", len(data))
	return nil
}

// Init prepares the server's transfer limit and metrics.
func (s *Server) Init() *Server {
	s.metrics = newServerMetrics()
	limit := s.Limit
	if limit <= 0 {
		limit = 4
	}
	s.sem = make(chan struct{}, limit)
	return s
}

func writeJSON(w http.ResponseWriter, v any) error {
	var buf bytes.Buffer
	if err := json.NewEncoder(&buf).Encode(v); err != nil {
		return err
	}
	w.Header().Set("Content-Type", "application/json")
	_, err := w.Write(buf.Bytes())
	return err
}

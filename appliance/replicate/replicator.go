package replicate

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/protocol/identity"
	"github.com/prometheus/client_golang/prometheus"
)

// Options bound the replicator's work. Zero values take the defaults.
type Options struct {
	// Workers is the number of concurrent pushes per peer (default 2).
	Workers int
	// MaxPending bounds the queue of objects waiting for one peer (default
	// 100,000 references, never object data). Beyond it new objects are
	// left to the next anti-entropy pass, which is started early: ingest
	// never waits for a peer.
	MaxPending int
	// AntiEntropyEvery is the period of the full comparison (default 1 min).
	AntiEntropyEvery time.Duration
	// ProbeEvery is how often every path is checked (default 2 s).
	ProbeEvery time.Duration
	// DialTimeout bounds connecting and the TLS handshake (default 3 s).
	DialTimeout time.Duration
	// MinRate is the transfer rate below which a push is given up and
	// retried, in bytes/s (default 256 KiB/s); every request also gets 10 s.
	MinRate int64
}

func (o *Options) defaults() {
	if o.Workers <= 0 {
		o.Workers = 2
	}
	if o.MaxPending <= 0 {
		o.MaxPending = 100000
	}
	if o.AntiEntropyEvery <= 0 {
		o.AntiEntropyEvery = time.Minute
	}
	if o.ProbeEvery <= 0 {
		o.ProbeEvery = 2 * time.Second
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = 3 * time.Second
	}
	if o.MinRate <= 0 {
		o.MinRate = 256 << 10
	}
}

// Replicator pushes objects to the peers and runs anti-entropy.
type Replicator struct {
	store Store
	ids   identity.Verifier
	cert  func() *tls.Certificate
	log   *slog.Logger
	opts  Options

	mu      sync.Mutex
	peers   map[string]*peer
	ctx     context.Context
	metrics *replicatorMetrics
}

// New makes a replicator. cert returns the appliance's current attested
// certificates (they change at every re-attestation); ids decides a
// peer's identity (k brokers must vouch for its key).
func New(ctx context.Context, st Store, ids identity.Verifier, cert func() *tls.Certificate, log *slog.Logger, opts Options) *Replicator {
	opts.defaults()
	return &Replicator{store: st, ids: ids, cert: cert, log: log, opts: opts, peers: map[string]*peer{}, ctx: ctx, metrics: newReplicatorMetrics()}
}

type peer struct {
	id     string
	r      *Replicator
	paths  []*path
	cancel context.CancelFunc
	wake   chan struct{}
	ae     chan struct{}

	mu       sync.Mutex
	pending  map[string]*item
	order    []string // FIFO of pending keys
	overflow bool
	lastErr  string

	sent, sentBytes, failures, conflicts, pulled prometheus.Counter
}

// SetPeers replaces the set of peers: new peers start replicating at once
// (with an anti-entropy pass), peers no longer listed are stopped.
func (r *Replicator) SetPeers(peers []api.Peer) {
	r.mu.Lock()
	defer r.mu.Unlock()
	want := map[string]api.Peer{}
	for _, p := range peers {
		want[p.ID] = p
	}
	for id, p := range r.peers {
		if np, ok := want[id]; !ok || !sameEndpoints(p, np.Endpoints) {
			p.cancel()
			delete(r.peers, id)
			r.metrics.forget(id)
			r.log.Info("replication peer removed", "peer", id)
		}
	}
	for id, ap := range want {
		if _, ok := r.peers[id]; ok {
			continue
		}
		p := r.newPeer(ap)
		r.peers[id] = p
		r.log.Info("replication peer added", "peer", id, "endpoints", ap.Endpoints)
	}
}

func sameEndpoints(p *peer, eps []string) bool {
	return slices.EqualFunc(p.paths, eps, func(pa *path, e string) bool { return pa.endpoint == e })
}

// peerList returns the current peers, by id.
func (r *Replicator) peerList() []*peer {
	r.mu.Lock()
	defer r.mu.Unlock()
	peers := make([]*peer, 0, len(r.peers))
	for _, p := range r.peers {
		peers = append(peers, p)
	}
	sort.Slice(peers, func(i, j int) bool { return peers[i].id < peers[j].id })
	return peers
}

// IsPeer reports whether id is a current peer (the server's Allowed).
func (r *Replicator) IsPeer(id string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	_, ok := r.peers[id]
	return ok
}

func (r *Replicator) newPeer(ap api.Peer) *peer {
	ctx, cancel := context.WithCancel(r.ctx)
	p := &peer{id: ap.ID, r: r, cancel: cancel, wake: make(chan struct{}, 1), ae: make(chan struct{}, 1), pending: map[string]*item{}}
	r.metrics.attach(p)
	for _, e := range ap.Endpoints {
		pa := &path{endpoint: e, inflight: map[*context.CancelFunc]bool{}}
		pa.client = &http.Client{Transport: r.transport(ap.ID, e)}
		pa.probe = &http.Client{Transport: r.transport(ap.ID, e), Timeout: r.opts.DialTimeout}
		pa.up.Store(true)
		p.paths = append(p.paths, pa)
	}
	for range r.opts.Workers {
		go p.work(ctx)
	}
	go p.probeLoop(ctx)
	go p.antiEntropyLoop(ctx)
	return p
}

// transport dials one endpoint and accepts only the peer's attested
// certificate.
func (r *Replicator) transport(id, endpoint string) *http.Transport {
	d := &net.Dialer{Timeout: r.opts.DialTimeout, KeepAlive: 5 * time.Second}
	return &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", endpoint)
		},
		TLSHandshakeTimeout: r.opts.DialTimeout,
		MaxIdleConnsPerHost: r.opts.Workers + 1,
		IdleConnTimeout:     30 * time.Second,
		TLSClientConfig: &tls.Config{
			MinVersion: tls.VersionTLS12,
			// The peer is identified by its attested certificate, not by
			// the address it is reached at (a forward or a NAT).
			InsecureSkipVerify: true,
			VerifyConnection: func(cs tls.ConnectionState) error {
				got, err := r.ids.Verify(cs.PeerCertificates, time.Now(), x509.ExtKeyUsageServerAuth)
				if err != nil {
					return err
				}
				if got.ID != id {
					return fmt.Errorf("endpoint %s is appliance %s, not peer %s", endpoint, got.ID, id)
				}
				return nil
			},
			GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
				if c := r.cert(); c != nil {
					return c, nil
				}
				return &tls.Certificate{}, nil
			},
		},
	}
}

// Stored queues an object for every peer; call it once the object is
// durable locally. It never blocks.
func (r *Replicator) Stored(ns, name string, size int64) {
	if !Replicated(ns) {
		return
	}
	for _, p := range r.peerList() {
		p.enqueue(ns, name, size, time.Now())
	}
}

// Lag reports, per peer, what is waiting to be replicated.
func (r *Replicator) Lag() []api.PeerHealth {
	peers := r.peerList()
	out := make([]api.PeerHealth, 0, len(peers))
	now := time.Now()
	for _, p := range peers {
		h := api.PeerHealth{ID: p.id}
		for _, pa := range p.paths {
			if pa.up.Load() {
				h.Path = pa.endpoint
				break
			}
		}
		p.mu.Lock()
		h.PendingObjects = len(p.pending)
		for _, it := range p.pending {
			h.PendingBytes += it.size
			if age := now.Sub(it.since).Seconds(); age > h.OldestSeconds {
				h.OldestSeconds = age
			}
		}
		h.LastError = p.lastErr
		p.mu.Unlock()
		out = append(out, h)
	}
	return out
}

// Fetch gets an object from the first peer that has a copy that verifies
// (content-addressed objects are checked against their name; the store
// checks named ones against the digest it recorded).
func (r *Replicator) Fetch(ctx context.Context, ns, name string) ([]byte, error) {
	peers := r.peerList()
	if len(peers) == 0 {
		return nil, errors.New("no peer to fetch from")
	}
	var errs []error
	for _, p := range peers {
		data, err := p.fetch(ctx, ns, name)
		if err == nil {
			return data, nil
		}
		errs = append(errs, fmt.Errorf("peer %s: %w", p.id, err))
	}
	return nil, errors.Join(errs...)
}

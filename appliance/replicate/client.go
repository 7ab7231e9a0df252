package replicate

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dataembassy/embassy/appliance/objectio"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/protocol/identity"
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
	roots *x509.CertPool
	cert  func() *tls.Certificate
	log   *slog.Logger
	opts  Options

	mu    sync.Mutex
	peers map[string]*peer
	ctx   context.Context
}

// New makes a replicator. cert returns the appliance's current attested
// certificate (it changes at every re-attestation); roots are the brokers'
// CA certificates.
func New(ctx context.Context, st Store, roots *x509.CertPool, cert func() *tls.Certificate, log *slog.Logger, opts Options) *Replicator {
	opts.defaults()
	return &Replicator{store: st, roots: roots, cert: cert, log: log, opts: opts, peers: map[string]*peer{}, ctx: ctx}
}

// item is one object waiting for a peer.
type item struct {
	ns, name string
	size     int64
	since    time.Time
	busy     bool
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

	sent, sentBytes, failures, conflicts, pulled atomic.Int64
}

type path struct {
	endpoint string
	client   *http.Client
	probe    *http.Client
	up       atomic.Bool
	mu       sync.Mutex
	inflight map[*context.CancelFunc]bool
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
				got, err := identity.Verify(cs.PeerCertificates, r.roots, time.Now(), x509.ExtKeyUsageServerAuth)
				if err != nil {
					return err
				}
				if got != id {
					return fmt.Errorf("endpoint %s is appliance %s, not peer %s", endpoint, got, id)
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

func (p *peer) enqueue(ns, name string, size int64, since time.Time) {
	key := ns + "\x00" + name
	p.mu.Lock()
	if _, ok := p.pending[key]; ok {
		p.mu.Unlock()
		return
	}
	if len(p.pending) >= p.r.opts.MaxPending {
		if !p.overflow {
			p.r.log.Warn("replication queue full; anti-entropy will catch up", "peer", p.id, "pending", len(p.pending))
		}
		p.overflow = true
		p.mu.Unlock()
		return
	}
	p.pending[key] = &item{ns: ns, name: name, size: size, since: since}
	p.order = append(p.order, key)
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// next takes the oldest idle item.
func (p *peer) next() (string, *item) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.order) > 2*len(p.pending)+64 {
		p.compact()
	}
	for _, key := range p.order {
		if it, ok := p.pending[key]; ok && !it.busy {
			it.busy = true
			return key, it
		}
	}
	return "", nil
}

func (p *peer) compact() {
	live := p.order[:0]
	for _, k := range p.order {
		if _, ok := p.pending[k]; ok {
			live = append(live, k)
		}
	}
	p.order = live
}

func (p *peer) done(key string, ok bool, errText string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ok {
		delete(p.pending, key)
		if len(p.pending) == 0 {
			p.order = p.order[:0]
			if p.overflow {
				p.overflow = false
				select {
				case p.ae <- struct{}{}:
				default:
				}
			}
		}
		return
	}
	if it := p.pending[key]; it != nil {
		it.busy = false
	}
	p.lastErr = errText
}

func (p *peer) work(ctx context.Context) {
	backoff := time.Second
	for {
		key, it := p.next()
		if it == nil {
			select {
			case <-ctx.Done():
				return
			case <-p.wake:
				continue
			case <-time.After(time.Second):
				continue
			}
		}
		err := p.push(ctx, it)
		switch {
		case err == nil:
			p.done(key, true, "")
			backoff = time.Second
			// More may be waiting; let a sibling worker wake too.
			select {
			case p.wake <- struct{}{}:
			default:
			}
		case errors.Is(err, errPermanent):
			p.conflicts.Add(1)
			p.r.log.Error("replication refused by peer; object left out", "peer", p.id, "ns", it.ns, "name", it.name, "err", err.Error())
			p.done(key, true, err.Error())
		default:
			p.failures.Add(1)
			p.done(key, false, err.Error())
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 10*time.Second)
		}
	}
}

var errPermanent = errors.New("permanent refusal")

// push sends one object to the peer.
func (p *peer) push(ctx context.Context, it *item) error {
	data, err := p.r.store.Get(it.ns, it.name)
	if err != nil {
		return fmt.Errorf("read %s/%s: %w", it.ns, it.name, err)
	}
	q := url.Values{"ns": {it.ns}, "name": {it.name}}
	resp, err := p.do(ctx, http.MethodPut, PathObject+"?"+q.Encode(), data)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
	switch {
	case resp.StatusCode/100 == 2:
		p.sent.Add(1)
		p.sentBytes.Add(int64(len(data)))
		return nil
	case resp.StatusCode == http.StatusConflict || resp.StatusCode == http.StatusBadRequest || resp.StatusCode == http.StatusRequestEntityTooLarge:
		return fmt.Errorf("%w: %s: %s", errPermanent, resp.Status, bytes.TrimSpace(msg))
	}
	return fmt.Errorf("peer answered %s: %s", resp.Status, bytes.TrimSpace(msg))
}

// do sends a request over the first path that is up, falling over to the
// next at once when a path fails. A failed path is marked down and left to
// the prober.
func (p *peer) do(ctx context.Context, method, target string, body []byte) (*http.Response, error) {
	if len(p.paths) == 0 {
		return nil, errors.New("no path to the peer")
	}
	var errs []error
	for _, pa := range p.pathsToTry() {
		resp, err := pa.send(ctx, p.r.opts, method, target, body)
		if err == nil {
			return resp, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if pa.up.CompareAndSwap(true, false) {
			p.r.log.Warn("replication path down; trying the next", "peer", p.id, "endpoint", pa.endpoint, "err", err.Error())
		}
		errs = append(errs, fmt.Errorf("%s: %w", pa.endpoint, err))
	}
	return nil, errors.Join(errs...)
}

// pathsToTry lists the paths: those up first, in configured order, then
// those down (a path may come back before the prober notices).
func (p *peer) pathsToTry() []*path {
	var up, down []*path
	for _, pa := range p.paths {
		if pa.up.Load() {
			up = append(up, pa)
		} else {
			down = append(down, pa)
		}
	}
	return append(up, down...)
}

func (pa *path) send(ctx context.Context, o Options, method, target string, body []byte) (*http.Response, error) {
	limit := 10*time.Second + time.Duration(int64(len(body))*int64(time.Second)/o.MinRate)
	rctx, cancel := context.WithTimeout(ctx, limit)
	pa.track(&cancel, true)
	req, err := http.NewRequestWithContext(rctx, method, "https://"+pa.endpoint+target, bytes.NewReader(body))
	if err != nil {
		pa.track(&cancel, false)
		cancel()
		return nil, err
	}
	resp, err := pa.client.Do(req)
	if err != nil {
		pa.track(&cancel, false)
		cancel()
		return nil, err
	}
	resp.Body = &cancelOnClose{ReadCloser: resp.Body, done: func() { pa.track(&cancel, false); cancel() }}
	return resp, nil
}

// track remembers in-flight requests so that a path found dead cancels them.
func (pa *path) track(c *context.CancelFunc, add bool) {
	pa.mu.Lock()
	defer pa.mu.Unlock()
	if add {
		pa.inflight[c] = true
	} else {
		delete(pa.inflight, c)
	}
}

func (pa *path) abort() {
	pa.mu.Lock()
	defer pa.mu.Unlock()
	for c := range pa.inflight {
		(*c)()
	}
	pa.client.CloseIdleConnections()
}

type cancelOnClose struct {
	io.ReadCloser
	done func()
	once sync.Once
}

func (c *cancelOnClose) Close() error {
	err := c.ReadCloser.Close()
	c.once.Do(c.done)
	return err
}

// probeLoop pings every path. A path that stops answering is marked down
// and its requests are cancelled, so they are retried on another path at
// once; a path that answers again is marked up and preferred again.
func (p *peer) probeLoop(ctx context.Context) {
	t := time.NewTicker(p.r.opts.ProbeEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, pa := range p.paths {
			err := pa.ping(ctx)
			if ctx.Err() != nil {
				return
			}
			switch {
			case err != nil && pa.up.CompareAndSwap(true, false):
				p.r.log.Warn("replication path down", "peer", p.id, "endpoint", pa.endpoint, "err", err.Error())
				pa.abort()
			case err == nil && pa.up.CompareAndSwap(false, true):
				p.r.log.Info("replication path up again", "peer", p.id, "endpoint", pa.endpoint)
				select {
				case p.wake <- struct{}{}:
				default:
				}
			}
		}
	}
}

func (pa *path) ping(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+pa.endpoint+PathPing, nil)
	if err != nil {
		return err
	}
	resp, err := pa.probe.Do(req)
	if err != nil {
		return err
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 1024))
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		return fmt.Errorf("ping answered %s", resp.Status)
	}
	return nil
}

func (p *peer) antiEntropyLoop(ctx context.Context) {
	for {
		if err := p.antiEntropy(ctx); err != nil && ctx.Err() == nil {
			p.mu.Lock()
			p.lastErr = err.Error()
			p.mu.Unlock()
			p.r.log.Warn("anti-entropy pass failed", "peer", p.id, "err", err.Error())
		}
		wait := p.r.opts.AntiEntropyEvery
		select {
		case <-ctx.Done():
			return
		case <-p.ae:
		case <-time.After(wait):
		}
	}
}

// antiEntropy compares every replicated namespace with the peer: objects
// the peer lacks are queued for it, objects only the peer has are fetched,
// verified and stored. A named object ("config") held by both with
// different content is reported, never overwritten.
func (p *peer) antiEntropy(ctx context.Context) error {
	start := time.Now()
	local, err := p.r.store.Namespaces()
	if err != nil {
		return err
	}
	var remote []string
	if err := p.getJSON(ctx, PathNamespaces, &remote); err != nil {
		return err
	}
	all := map[string]bool{}
	for _, ns := range append(local, remote...) {
		if Replicated(ns) {
			all[ns] = true
		}
	}
	names := make([]string, 0, len(all))
	for ns := range all {
		names = append(names, ns)
	}
	// Data before indexes before snapshots, so a peer never holds a
	// snapshot whose data it lacks for longer than needed.
	sort.Slice(names, func(i, j int) bool {
		return typeRank(names[i]) < typeRank(names[j]) || (typeRank(names[i]) == typeRank(names[j]) && names[i] < names[j])
	})
	queued, pulled := 0, 0
	for _, ns := range names {
		mine, err := p.r.store.List(ns)
		if err != nil {
			return err
		}
		var theirs []ListEntry
		if err := p.getJSON(ctx, PathList+"?"+url.Values{"ns": {ns}}.Encode(), &theirs); err != nil {
			return err
		}
		have := map[string]int64{}
		for _, o := range theirs {
			have[o.Name] = o.Size
		}
		ours := map[string]bool{}
		for _, o := range mine {
			ours[o.Name] = true
			if _, ok := have[o.Name]; !ok {
				p.enqueue(ns, o.Name, o.Size, time.Now())
				queued++
			} else if !objectio.ContentAddressed(o.Name) {
				if err := p.compareNamed(ctx, ns, o.Name); err != nil {
					p.r.log.Error("replicas differ", "peer", p.id, "ns", ns, "name", o.Name, "err", err.Error())
				}
			}
		}
		for _, o := range theirs {
			if ours[o.Name] {
				continue
			}
			if err := p.pull(ctx, ns, o.Name); err != nil {
				return fmt.Errorf("fetch %s/%s: %w", ns, o.Name, err)
			}
			pulled++
		}
	}
	p.r.log.Info("anti-entropy pass", "peer", p.id, "namespaces", len(names), "queued", queued, "fetched", pulled, "elapsed_ms", time.Since(start).Milliseconds())
	return nil
}

func typeRank(ns string) int {
	for i, t := range []string{"/config", "/keys", "/data", "/index", "/snapshots"} {
		if strings.HasSuffix(ns, t) {
			return i
		}
	}
	return 9
}

// get sends a GET over the peer's paths and returns the body of a 200.
func (p *peer) get(ctx context.Context, target string) (io.ReadCloser, error) {
	resp, err := p.do(ctx, http.MethodGet, target, nil)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		resp.Body.Close()
		return nil, fmt.Errorf("peer answered %s: %s", resp.Status, bytes.TrimSpace(msg))
	}
	return resp.Body, nil
}

// fetch gets an object from the peer; a content-addressed one is checked
// against its name.
func (p *peer) fetch(ctx context.Context, ns, name string) ([]byte, error) {
	body, err := p.get(ctx, PathObject+"?"+url.Values{"ns": {ns}, "name": {name}}.Encode())
	if err != nil {
		return nil, err
	}
	defer body.Close()
	data, err := objectio.ReadLimited(body, objectio.DefaultMaxObject)
	if err != nil {
		return nil, err
	}
	return data, objectio.CheckContent(name, data)
}

func (p *peer) pull(ctx context.Context, ns, name string) error {
	data, err := p.fetch(ctx, ns, name)
	if err != nil {
		return err
	}
	if _, err := p.r.store.Put(ns, name, data); err != nil {
		return err
	}
	p.pulled.Add(1)
	return nil
}

func (p *peer) compareNamed(ctx context.Context, ns, name string) error {
	theirs, err := p.fetch(ctx, ns, name)
	if err != nil {
		return err
	}
	mine, err := p.r.store.Get(ns, name)
	if err != nil {
		return err
	}
	if !bytes.Equal(mine, theirs) {
		p.conflicts.Add(1)
		return errors.New("named object differs between the appliances; left as it is on both")
	}
	return nil
}

func (p *peer) getJSON(ctx context.Context, target string, v any) error {
	body, err := p.get(ctx, target)
	if err != nil {
		return err
	}
	defer body.Close()
	return json.NewDecoder(io.LimitReader(body, 64<<20)).Decode(v)
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

// WriteMetrics writes per-peer lag and counters in Prometheus text format.
func (r *Replicator) WriteMetrics(w io.Writer) {
	lag := r.Lag()
	fmt.Fprintln(w, "# TYPE embassy_replication_pending_objects gauge")
	for _, h := range lag {
		fmt.Fprintf(w, "embassy_replication_pending_objects{peer=%q} %d\n", h.ID, h.PendingObjects)
	}
	fmt.Fprintln(w, "# TYPE embassy_replication_pending_bytes gauge")
	for _, h := range lag {
		fmt.Fprintf(w, "embassy_replication_pending_bytes{peer=%q} %d\n", h.ID, h.PendingBytes)
	}
	fmt.Fprintln(w, "# TYPE embassy_replication_oldest_pending_seconds gauge")
	for _, h := range lag {
		fmt.Fprintf(w, "embassy_replication_oldest_pending_seconds{peer=%q} %.3f\n", h.ID, h.OldestSeconds)
	}
	peers := r.peerList()
	for _, m := range []struct {
		name string
		get  func(*peer) int64
	}{
		{"embassy_replication_sent_objects_total", func(p *peer) int64 { return p.sent.Load() }},
		{"embassy_replication_sent_bytes_total", func(p *peer) int64 { return p.sentBytes.Load() }},
		{"embassy_replication_fetched_objects_total", func(p *peer) int64 { return p.pulled.Load() }},
		{"embassy_replication_failures_total", func(p *peer) int64 { return p.failures.Load() }},
		{"embassy_replication_conflicts_total", func(p *peer) int64 { return p.conflicts.Load() }},
	} {
		fmt.Fprintf(w, "# TYPE %s counter\n", m.name)
		for _, p := range peers {
			fmt.Fprintf(w, "%s{peer=%q} %d\n", m.name, p.id, m.get(p))
		}
	}
	fmt.Fprintln(w, "# TYPE embassy_replication_path_up gauge")
	for _, p := range peers {
		for _, pa := range p.paths {
			up := 0
			if pa.up.Load() {
				up = 1
			}
			fmt.Fprintf(w, "embassy_replication_path_up{peer=%q,endpoint=%q} %d\n", p.id, pa.endpoint, up)
		}
	}
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

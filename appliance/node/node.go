// Package node is the appliance's serving node: the TLS listener on the
// ingest port, the exact-path dispatch of its requests (the node's own
// endpoints, replication, else the restic REST ingest), health, metrics,
// operators' remote attestation checks, and the periodic re-attestation
// that keeps it serving. It serves until a broker orders a lockdown or a
// re-attestation fails, then stops.
package node

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	stdlog "log"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/appliance/objectio"
	"github.com/dataembassy/embassy/appliance/replicate"
	"github.com/dataembassy/embassy/protocol/api"
)

// Paths of the health and metrics endpoints on the ingest listener.
const (
	PathHealth  = "/_embassy/health"
	PathMetrics = "/_embassy/metrics"
)

// Attester attests the appliance to its brokers and answers operators'
// remote attestation checks.
type Attester interface {
	ID() string
	AttestAll(ctx context.Context, bo attest.Backoff, want int) ([]*attest.Result, error)
	Challenge(nonce []byte) (*api.ChallengeResponse, error)
}

// LateAnswers are the answers of a round's brokers slower than its first
// k (*attest.Late): Done is closed once they have all answered or the
// round ended; Err then says whether one of them ordered a lockdown, and
// Certificate is the certificate to serve with theirs added (nil: keep
// the one served).
type LateAnswers interface {
	Done() <-chan struct{}
	Err() error
	Certificate() *tls.Certificate
}

// HealthSource reports the appliance's disks, blank disks and replication
// peers.
type HealthSource interface {
	Health() *api.Health
}

// HealthFunc adapts a function to a HealthSource.
type HealthFunc func() *api.Health

// Health calls f.
func (f HealthFunc) Health() *api.Health { return f() }

// Deps are what a node serves and whom it asks.
type Deps struct {
	Log      *slog.Logger
	Attester Attester
	Health   HealthSource
	// Ingest serves every path that is neither the node's own nor under
	// replicate.Prefix; Replication serves replicate.Prefix; Metrics serves
	// PathMetrics.
	Ingest, Replication, Metrics http.Handler
	// Cert holds the certificate served, the one the brokers issued; the
	// node replaces it after each re-attestation.
	Cert *atomic.Pointer[tls.Certificate]
	// Port is the ingest port, opened on every address.
	Port int
	// Threshold is how many brokers must answer a re-attestation (k).
	Threshold int
	// ReattestEvery is the first re-attestation interval, the boot
	// round's (5 minutes if not positive); each re-attestation's round
	// then sets the next one (attest.Round.ReattestAfter). Every interval
	// is clamped to ReattestBounds.
	ReattestEvery time.Duration
	// ReattestBounds bound every interval (attest.DefaultReattestBounds
	// when zero): no broker's answer can stop re-attestation, and with it
	// revocation, or make it spin.
	ReattestBounds attest.ReattestBounds
	// Late are the boot round's answers after its first k (the unlock did
	// not wait for them): a lockdown among them stops the node as a
	// re-attestation's does; otherwise their certificates join the one
	// served, unless a re-attestation replaced it already. Nil: none.
	Late LateAnswers
	// Reattested is called with each successful re-attestation's round.
	Reattested func(attest.Round)
	// MinUploadRate is the slowest an upload body may arrive, in bytes per
	// second, after UploadGrace (64 KiB/s and 30 s when zero): a client
	// that sends slower is cut, so no one holds a connection and the
	// upload budget with a trickle.
	MinUploadRate int64
	UploadGrace   time.Duration
	// Monitor authenticates a request for health or metrics (a client
	// certificate from the home-state client CA: a monitoring identity).
	// Without it, health and metrics answer 401 to everyone.
	Monitor func(r *http.Request) error
	// Upgrade takes pushed image upgrades (api.PathUpgrade), for monitors
	// only (the image must be signed and approved at k brokers anyway).
	// Nil: the path answers 404.
	Upgrade http.Handler
}

// Node serves the appliance's ingest port.
type Node struct {
	d   Deps
	own map[string]http.HandlerFunc
	srv *http.Server
	ln  net.Listener
}

// New makes a node; it serves nothing until Listen or Run.
func New(d Deps) *Node {
	n := &Node{d: d}
	n.own = map[string]http.HandlerFunc{
		api.PathChallenge: n.challenge,
		// Health and metrics carry no data and no secret, but disk states,
		// serials, peers and lag are the home state's business: only
		// monitors see them.
		PathHealth:  n.monitorsOnly(n.health),
		PathMetrics: n.monitorsOnly(d.Metrics.ServeHTTP),
	}
	if d.Upgrade != nil {
		n.own[api.PathUpgrade] = n.monitorsOnly(d.Upgrade.ServeHTTP)
	}
	n.srv = &http.Server{
		Handler: n.Handler(),
		TLSConfig: &tls.Config{
			GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return d.Cert.Load(), nil },
			ClientAuth:     tls.RequestClientCert, MinVersion: tls.VersionTLS12,
		},
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          stdlog.New(io.Discard, "", 0),
	}
	return n
}

// Handler dispatches on the exact request path: http.ServeMux would clean
// "/repo/../x" into a redirect, and the ingest server must see and refuse
// such paths.
func (n *Node) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.bodyDeadline(w, r)
		if h, ok := n.own[r.URL.Path]; ok {
			h(w, r)
			return
		}
		if strings.HasPrefix(r.URL.Path, replicate.Prefix) {
			n.d.Replication.ServeHTTP(w, r)
			return
		}
		n.d.Ingest.ServeHTTP(w, r)
	})
}

// Health is the JSON answer of PathHealth.
type Health struct {
	ApplianceID string           `json:"appliance_id"`
	Degraded    bool             `json:"degraded"`
	Disks       []api.DiskHealth `json:"disks"`
	BlankDisks  []api.DiskHealth `json:"blank_disks"`
	Peers       []api.PeerHealth `json:"peers"`
}

// bodyDeadline gives a request with a body until grace plus its length
// at the minimum upload rate (an unknown length counts as the largest
// object) to arrive; past that the server stops reading and the
// connection is closed.
func (n *Node) bodyDeadline(w http.ResponseWriter, r *http.Request) {
	if r.Body == nil || r.Body == http.NoBody {
		return
	}
	rate, grace := n.d.MinUploadRate, n.d.UploadGrace
	if rate <= 0 {
		rate = 64 << 10
	}
	if grace <= 0 {
		grace = 30 * time.Second
	}
	size := r.ContentLength
	if size < 0 {
		size = objectio.DefaultMaxObject
	}
	deadline := time.Now().Add(grace + time.Duration(size)*time.Second/time.Duration(rate))
	// An error means the connection cannot take deadlines (a test
	// recorder); the server's own timeouts still apply.
	_ = http.NewResponseController(w).SetReadDeadline(deadline)
}

// monitorsOnly answers 401 to a request that Deps.Monitor does not
// authenticate.
func (n *Node) monitorsOnly(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if n.d.Monitor == nil {
			http.Error(w, "no monitoring identity is configured", http.StatusUnauthorized)
			return
		}
		if err := n.d.Monitor(r); err != nil {
			http.Error(w, "monitoring needs a client certificate from the home-state client CA: "+err.Error(), http.StatusUnauthorized)
			return
		}
		h(w, r)
	}
}

// health answers 503 while the store is degraded, so a load balancer or
// monitor notices without parsing the body.
func (n *Node) health(w http.ResponseWriter, r *http.Request) {
	h := n.d.Health.Health()
	w.Header().Set("Content-Type", "application/json")
	if h.Degraded {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	json.NewEncoder(w).Encode(Health{ApplianceID: n.d.Attester.ID(), Degraded: h.Degraded, Disks: h.Disks,
		BlankDisks: h.BlankDisks, Peers: h.Peers})
}

// challenge serves operators' remote attestation checks: anyone may ask
// (the evidence is not secret), one quote at a time.
func (n *Node) challenge(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "use POST", http.StatusMethodNotAllowed)
		return
	}
	var req api.ChallengeRequest
	dec := json.NewDecoder(io.LimitReader(r.Body, 4096))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		http.Error(w, "bad request: "+err.Error(), http.StatusBadRequest)
		return
	}
	resp, err := n.d.Attester.Challenge(req.Nonce)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	n.d.Log.Info("remote attestation check answered")
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(resp)
}

// Listen opens the ingest port and starts serving on it.
func (n *Node) Listen() error {
	ln, err := net.Listen("tcp", fmt.Sprintf(":%d", n.d.Port))
	if err != nil {
		return err
	}
	n.ln = ln
	go n.srv.ServeTLS(ln, "", "")
	return nil
}

// Reason says why a node stopped serving.
type Reason string

// Reasons to stop.
const (
	ReasonListen         Reason = "ingest listen"
	ReasonLockdown       Reason = "lockdown"
	ReasonReattestFailed Reason = "re-attestation failed"
	ReasonDone           Reason = "context done"
)

// StopError is why Run returned; it wraps the cause (an
// *attest.LockdownError for a lockdown).
type StopError struct {
	Reason Reason
	Err    error
}

func (e *StopError) Error() string { return fmt.Sprintf("%s: %v", e.Reason, e.Err) }

func (e *StopError) Unwrap() error { return e.Err }

// defaultReattestEvery is the first interval when Deps.ReattestEvery is
// not positive.
const defaultReattestEvery = 5 * time.Minute

// Run serves (listening first unless Listen was called) and re-attests
// after each round's interval until a broker orders a lockdown (in a
// re-attestation, or late in the boot round), a re-attestation fails or
// ctx ends. It then stops the server and says why (never nil).
func (n *Node) Run(ctx context.Context) *StopError {
	if n.ln == nil {
		if err := n.Listen(); err != nil {
			return &StopError{Reason: ReasonListen, Err: err}
		}
	}
	defer n.srv.Close()
	bounds := n.reattestBounds()
	every := n.d.ReattestEvery
	if every <= 0 {
		every = defaultReattestEvery
	}
	var late <-chan struct{}
	var bootCert *tls.Certificate
	if n.d.Late != nil {
		late = n.d.Late.Done()
		bootCert = n.d.Cert.Load()
	}
	t := time.NewTimer(bounds.Clamp(every))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return &StopError{Reason: ReasonDone, Err: ctx.Err()}
		case <-late:
			late = nil
			if err := n.d.Late.Err(); err != nil {
				return n.stopped(ctx, err)
			}
			// A peer still counts k brokers if it refuses one of the
			// first k's certificates.
			if c := n.d.Late.Certificate(); c != nil && bootCert != nil {
				n.d.Cert.CompareAndSwap(bootCert, c)
			}
		case <-t.C:
			round, stop := n.reattest(ctx)
			if stop != nil {
				return stop
			}
			t.Reset(round.ReattestAfter(bounds))
		}
	}
}

// reattestBounds are Deps.ReattestBounds, or the defaults when unset.
func (n *Node) reattestBounds() attest.ReattestBounds {
	if n.d.ReattestBounds == (attest.ReattestBounds{}) {
		return attest.DefaultReattestBounds()
	}
	return n.d.ReattestBounds
}

func (n *Node) reattest(ctx context.Context) (attest.Round, *StopError) {
	round, cancel := context.WithTimeout(ctx, time.Minute)
	res, err := n.d.Attester.AttestAll(round, attest.Backoff{Initial: time.Second, Max: 5 * time.Second}, n.d.Threshold)
	cancel()
	if err != nil {
		return nil, n.stopped(ctx, err)
	}
	n.d.Cert.Store(attest.Round(res).Certificate())
	if n.d.Reattested != nil {
		n.d.Reattested(res)
	}
	n.d.Log.Info("re-attested", "brokers", len(res), "image_version", res[0].ImageVersion)
	return res, nil
}

// stopped logs why a round's answers stop the node and says so: a
// lockdown order, else the end of ctx (the round was cut short, not
// failed), else a failed re-attestation.
func (n *Node) stopped(ctx context.Context, err error) *StopError {
	var ld *attest.LockdownError
	if errors.As(err, &ld) {
		n.d.Log.Error(logmsg.MsgLockdown, "broker", ld.Broker, "reason", ld.Reason)
		return &StopError{Reason: ReasonLockdown, Err: err}
	}
	if ctx.Err() != nil {
		return &StopError{Reason: ReasonDone, Err: ctx.Err()}
	}
	n.d.Log.Error("re-attestation failed", "err", err.Error())
	return &StopError{Reason: ReasonReattestFailed, Err: err}
}

// Package attest is the appliance's client of the home-state key brokers:
// enrollment (credential activation), attestation to all brokers in
// parallel with retry and per-NIC endpoint failover, import of the released
// shares through the TPM, recombination of k shares per disk in memory, and
// deposit of a new disk's shares.
package attest

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	pb "github.com/google/go-tpm-tools/proto/tpm"
	"google.golang.org/protobuf/proto"

	"github.com/dataembassy/embassy/appliance/config"
	"github.com/dataembassy/embassy/keys/shamir"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/protocol/identity"
	"github.com/dataembassy/embassy/tpm/attester"
)

// TPM is what the client needs of the appliance's TPM.
type TPM interface {
	EKPublicDER() ([]byte, error)
	EKCertDER() []byte
	AKPublic() ([]byte, error)
	Activate(credBlob, encSecret []byte) ([]byte, error)
	Quote(extraData []byte) (*pb.Quote, error)
	Import(blob *pb.ImportBlob) ([]byte, error)
}

var _ TPM = (*attester.Attester)(nil)

// Client talks to the brokers of an image config.
type Client struct {
	cfg       *config.Config
	roots     map[string]*x509.CertPool // each broker's own CA, by name
	tpm       TPM
	tpmMu     sync.Mutex // one TPM command sequence at a time
	id        string
	tlsKey    crypto.Signer
	tlsPub    []byte
	eventLog  func() ([]byte, error)
	log       *slog.Logger
	transport http.RoundTripper
	health    atomic.Pointer[func() *api.Health]
	disks     atomic.Pointer[[]string]
	lastGood  sync.Map // broker name -> index of the endpoint that answered last
}

// ReportHealth sets what each attestation reports about the appliance's
// disks and peers (nil: nothing).
func (c *Client) ReportHealth(fn func() *api.Health) {
	if fn == nil {
		c.health.Store(nil)
		return
	}
	c.health.Store(&fn)
}

// ReportDisks sets the LUKS UUIDs of the disks in our format that each
// attestation lists (at most api.MaxRequestDisks are sent), so the
// brokers audit why any of them gets no key.
// A UUID a broker would refuse (a header says what it likes) is left
// out rather than spoil the attestation.
func (c *Client) ReportDisks(uuids []string) {
	var valid []string
	for _, u := range uuids {
		if api.CheckDiskID(u) == nil && !slices.Contains(valid, u) && len(valid) < api.MaxRequestDisks {
			valid = append(valid, u)
		}
	}
	c.disks.Store(&valid)
}

// New makes a client. brokerCAs holds each broker's own CA, by broker
// name: the client talks to broker i (and deposits share i) only over TLS
// that chains to broker i's CA, so no other broker's CA can stand in for
// it. tlsKey is the appliance's ephemeral TLS key whose hash goes into
// every quote; eventLog reads the firmware event log.
func New(cfg *config.Config, brokerCAs map[string]*x509.CertPool, tpm TPM, tlsKey crypto.Signer, eventLog func() ([]byte, error), log *slog.Logger) (*Client, error) {
	for _, b := range cfg.Brokers {
		if brokerCAs[b.Name] == nil {
			return nil, fmt.Errorf("broker %s: no CA pinned for it", b.Name)
		}
	}
	ek, err := tpm.EKPublicDER()
	if err != nil {
		return nil, err
	}
	pub, err := x509.MarshalPKIXPublicKey(tlsKey.Public())
	if err != nil {
		return nil, err
	}
	return &Client{cfg: cfg, roots: brokerCAs, tpm: tpm, id: api.ApplianceID(ek), tlsKey: tlsKey, tlsPub: pub,
		eventLog: eventLog, log: log}, nil
}

// Verifier is how this appliance decides a peer's identity: k of its
// brokers, each through its own pinned CA, must vouch for the peer's key.
func (c *Client) Verifier() identity.Verifier {
	v := identity.Verifier{Threshold: c.cfg.Threshold}
	for _, b := range c.cfg.Brokers {
		v.Brokers = append(v.Brokers, identity.Authority{Broker: b.Name, Roots: c.roots[b.Name]})
	}
	return v
}

// ID is the appliance id the brokers know it by.
func (c *Client) ID() string { return c.id }

// TLSPublicKey returns the PKIX DER of the ephemeral TLS key.
func (c *Client) TLSPublicKey() []byte { return c.tlsPub }

// httpClient dials broker b, believing only b's own CA.
func (c *Client) httpClient(b config.Broker, cert *tls.Certificate) *http.Client {
	tc := &tls.Config{RootCAs: c.roots[b.Name], MinVersion: tls.VersionTLS13}
	if cert != nil {
		tc.Certificates = []tls.Certificate{*cert}
	}
	// A short dial timeout: an endpoint behind a NIC whose link is down
	// must fail fast so the broker's next endpoint is tried in time.
	d := &net.Dialer{Timeout: 3 * time.Second}
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: tc, DisableKeepAlives: true,
		DialContext: d.DialContext, TLSHandshakeTimeout: 5 * time.Second}}
}

// endpointOrder lists broker b's endpoints, the one that answered last
// first.
func (c *Client) endpointOrder(b config.Broker) []int {
	order := make([]int, 0, len(b.Endpoints))
	first := 0
	if v, ok := c.lastGood.Load(b.Name); ok && v.(int) < len(b.Endpoints) {
		first = v.(int)
	}
	order = append(order, first)
	for i := range b.Endpoints {
		if i != first {
			order = append(order, i)
		}
	}
	return order
}

// post sends req to each endpoint of broker b in turn until one answers.
func (c *Client) post(ctx context.Context, b config.Broker, path string, cert *tls.Certificate, req, resp any) error {
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	hc := c.httpClient(b, cert)
	var lastErr error
	for _, i := range c.endpointOrder(b) {
		ep := b.Endpoints[i]
		hr, err := http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimSuffix(ep, "/")+path, bytes.NewReader(body))
		if err != nil {
			return err
		}
		hr.Header.Set("Content-Type", "application/json")
		r, err := hc.Do(hr)
		if err != nil {
			lastErr = fmt.Errorf("broker %s at %s: %w", b.Name, ep, err)
			continue
		}
		data, err := io.ReadAll(io.LimitReader(r.Body, api.MaxBody))
		r.Body.Close()
		if err != nil {
			lastErr = fmt.Errorf("broker %s at %s: %w", b.Name, ep, err)
			continue
		}
		c.lastGood.Store(b.Name, i)
		if r.StatusCode != http.StatusOK {
			var e api.Error
			json.Unmarshal(data, &e)
			return &BrokerError{Broker: b.Name, Status: r.StatusCode, Code: e.Code, Message: e.Error, Lockdown: e.Lockdown}
		}
		if err := json.Unmarshal(data, resp); err != nil {
			return fmt.Errorf("broker %s: decode answer: %w", b.Name, err)
		}
		return nil
	}
	return lastErr
}

// Enroll registers the appliance with every broker and answers each
// broker's credential-activation challenge, with the platform evidence the
// broker records as the firmware reference: a quote over
// api.ActivationExtraData(secret) and the event log. An operator must
// still approve the enrollment on each broker.
func (c *Client) Enroll(ctx context.Context) error {
	ek, err := c.tpm.EKPublicDER()
	if err != nil {
		return err
	}
	ak, err := c.tpm.AKPublic()
	if err != nil {
		return err
	}
	evlog, err := c.eventLog()
	if err != nil {
		return err
	}
	req := api.EnrollRequest{EKPublic: ek, EKCert: c.tpm.EKCertDER(), AKPublic: ak}
	var errs []error
	for _, b := range c.cfg.Brokers {
		var ch api.EnrollChallenge
		if err := c.post(ctx, b, api.PathEnroll, nil, req, &ch); err != nil {
			errs = append(errs, err)
			continue
		}
		req, err := c.activation(ch, evlog)
		if err != nil {
			errs = append(errs, fmt.Errorf("broker %s: %w", b.Name, err))
			continue
		}
		var ok struct{}
		if err := c.post(ctx, b, api.PathActivate, nil, req, &ok); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// activation answers a broker's challenge: the secret the TPM releases
// and a quote by the activated AK bound to it, with the event log.
func (c *Client) activation(ch api.EnrollChallenge, evlog []byte) (*api.ActivateRequest, error) {
	c.tpmMu.Lock()
	defer c.tpmMu.Unlock()
	secret, err := c.tpm.Activate(ch.CredentialBlob, ch.EncryptedSecret)
	if err != nil {
		return nil, err
	}
	q, err := c.tpm.Quote(api.ActivationExtraData(secret))
	if err != nil {
		return nil, err
	}
	req := &api.ActivateRequest{ApplianceID: ch.ApplianceID, Secret: secret, Quote: q.GetQuote(), Signature: q.GetRawSig(),
		PCRs: map[int][]byte{}, EventLog: evlog}
	for i, v := range q.GetPcrs().GetPcrs() {
		req.PCRs[int(i)] = v
	}
	return req, nil
}

// Result is one broker's answer to an attestation.
type Result struct {
	Broker        string
	ImageVersion  uint64
	Shares        map[string]shamir.Share // by disk id, imported through the TPM
	Certificate   *tls.Certificate
	DiskApprovals int
	// ReattestAfter is the broker's re-attestation interval, clamped to
	// [MinReattestAfter, MaxReattestAfter].
	ReattestAfter time.Duration
	Peers         []api.Peer
	// Approved are the images the broker approved (at most
	// api.MaxApprovedImages), Floor the appliance's floor there.
	Approved []api.ApprovedImage
	Floor    uint64
	Err      error
}

// AttestOnce attests to one broker.
func (c *Client) AttestOnce(ctx context.Context, b config.Broker) *Result {
	res := &Result{Broker: b.Name, Shares: map[string]shamir.Share{}}
	var n api.NonceResponse
	if err := c.post(ctx, b, api.PathNonce, nil, api.NonceRequest{ApplianceID: c.id}, &n); err != nil {
		res.Err = err
		return res
	}
	evlog, err := c.eventLog()
	if err != nil {
		res.Err = err
		return res
	}
	tlsHash := sha256.Sum256(c.tlsPub)
	c.tpmMu.Lock()
	q, err := c.tpm.Quote(api.ExtraData(n.Nonce, tlsHash[:]))
	c.tpmMu.Unlock()
	if err != nil {
		res.Err = err
		return res
	}
	req := api.AttestRequest{ApplianceID: c.id, Nonce: n.Nonce, Quote: q.GetQuote(), Signature: q.GetRawSig(),
		PCRs: map[int][]byte{}, EventLog: evlog, TLSPublic: c.tlsPub, TLSAddresses: c.cfg.Ingest.Addresses}
	for i, v := range q.GetPcrs().GetPcrs() {
		req.PCRs[int(i)] = v
	}
	if fn := c.health.Load(); fn != nil {
		req.Health = (*fn)()
	}
	if d := c.disks.Load(); d != nil {
		req.Disks = *d
	}
	var resp api.AttestResponse
	if err := c.post(ctx, b, api.PathAttest, nil, req, &resp); err != nil {
		res.Err = err
		return res
	}
	res.ImageVersion, res.DiskApprovals = resp.ImageVersion, resp.DiskApprovals
	res.ReattestAfter = reattestAfter(resp.ReattestAfter)
	res.Peers = resp.Peers
	res.Approved, res.Floor = resp.Approved[:min(len(resp.Approved), api.MaxApprovedImages)], resp.Floor
	cert, err := c.checkCertificate(b, resp.Certificate, time.Now())
	if err != nil {
		// The broker's answer is refused whole, as if it had not answered:
		// what it sent must not spoil the chain the others vouch for.
		c.log.Warn(MsgCertificateRefused, "broker", b.Name, "err", err.Error())
		res.Err = fmt.Errorf("broker %s: %w", b.Name, err)
		return res
	}
	res.Certificate = cert
	// A broker whose answer fails half-way leaves no share behind.
	failShares := func(disk string, err error) *Result {
		Round{res}.WipeShares()
		res.Err = fmt.Errorf("broker %s share %s: %w", b.Name, disk, err)
		return res
	}
	for _, s := range resp.Shares {
		var blob pb.ImportBlob
		if err := proto.Unmarshal(s.Blob, &blob); err != nil {
			return failShares(s.DiskID, err)
		}
		c.tpmMu.Lock()
		raw, err := c.tpm.Import(&blob)
		c.tpmMu.Unlock()
		if err != nil {
			return failShares(s.DiskID, err)
		}
		sh, err := shamir.Parse(raw)
		clear(raw)
		if err != nil {
			return failShares(s.DiskID, err)
		}
		res.Shares[s.DiskID] = sh
	}
	return res
}

// MsgCertificateRefused is logged (with "broker" and "err") when a
// broker's certificate for this appliance fails checkCertificate; that
// broker's answer is then treated as a failed attestation.
const MsgCertificateRefused = "broker certificate refused"

// Bounds on what one broker may send as this appliance's certificate.
const (
	// maxBrokerChain: its leaf and up to three intermediates (a broker
	// sends its leaf and its service CA).
	maxBrokerChain = 4
	// maxCertificateBytes bounds each certificate's DER. With at most
	// identity.MaxPresented of them the presented chain stays far below
	// the 256 KiB a TLS peer (Go's crypto/tls) accepts in a handshake.
	maxCertificateBytes = 4 << 10
)

// checkCertificate checks what broker b sent as this appliance's
// certificate, as a twin will check it, before the appliance presents it:
// at most maxBrokerChain certificates of at most maxCertificateBytes each,
// all parsing; the leaf an end-entity certificate for exactly this
// appliance's TLS key, chaining to b's own pinned CA (no other broker's)
// for both server and client authentication, valid at now, naming this
// appliance's id (identity.Verify). It returns the chain to present: the
// leaf and the intermediates on its path to b's CA, and nothing else the
// broker sent (the anchor itself, extra or unrelated certificates).
func (c *Client) checkCertificate(b config.Broker, ders [][]byte, now time.Time) (*tls.Certificate, error) {
	if len(ders) == 0 {
		return nil, fmt.Errorf("%w: none sent", ErrBadCertificate)
	}
	if len(ders) > maxBrokerChain {
		return nil, fmt.Errorf("%w: a chain of %d, at most %d", ErrBadCertificate, len(ders), maxBrokerChain)
	}
	certs := make([]*x509.Certificate, len(ders))
	for i, der := range ders {
		if len(der) > maxCertificateBytes {
			return nil, fmt.Errorf("%w: certificate %d has %d bytes, at most %d", ErrBadCertificate, i, len(der), maxCertificateBytes)
		}
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("%w: certificate %d: %w", ErrBadCertificate, i, err)
		}
		certs[i] = cert
	}
	leaf := certs[0]
	if leaf.IsCA || !bytes.Equal(leaf.RawSubjectPublicKeyInfo, c.tlsPub) {
		return nil, fmt.Errorf("%w: not an end-entity certificate for this appliance's TLS key", ErrBadCertificate)
	}
	roots := c.roots[b.Name]
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		id, err := identity.Verify(certs, roots, now, usage)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrBadCertificate, err)
		}
		if id != c.id {
			return nil, fmt.Errorf("%w: names appliance %s, not %s", ErrBadCertificate, id, c.id)
		}
	}
	inter := x509.NewCertPool()
	for _, cert := range certs[1:] {
		inter.AddCert(cert)
	}
	chains, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadCertificate, err)
	}
	path := chains[0]
	for _, ch := range chains[1:] {
		if len(ch) < len(path) {
			path = ch
		}
	}
	// The last certificate of the path is the pinned anchor: every party
	// that checks the chain has it already.
	out := &tls.Certificate{PrivateKey: c.tlsKey, Leaf: leaf}
	for _, cert := range path[:max(1, len(path)-1)] {
		out.Certificate = append(out.Certificate, cert.Raw)
	}
	return out, nil
}

// Backoff bounds the retry delay of AttestAll.
type Backoff struct {
	Initial, Max time.Duration
}

// AttestFirst attests to every broker in parallel, retrying each failed
// broker with exponential backoff, and returns as soon as want brokers
// have answered (k to unlock at boot: the unlock does not wait for the
// slowest broker). A lockdown ordered by then is a *LockdownError; fewer
// than want answers when ctx ends is ErrBelowThreshold, naming each other
// broker's last failure. The other brokers' attestations go on until each
// has answered or ctx ends: the returned Late reports a lockdown that any
// of them orders, and their shares are wiped as they arrive. ctx bounds
// the whole round: keep it alive until Late is done.
func (c *Client) AttestFirst(ctx context.Context, bo Backoff, want int) ([]*Result, *Late, error) {
	return c.attest(ctx, bo, want, false)
}

// AttestAll attests to every broker like AttestFirst but returns only once
// every broker has answered or ctx ends (a re-attestation's or a
// provisioning's round): a lockdown from any broker answered by then, even
// one slower than the first want, is a *LockdownError. It returns every
// broker's successful result, or an error.
func (c *Client) AttestAll(ctx context.Context, bo Backoff, want int) ([]*Result, error) {
	ok, late, err := c.attest(ctx, bo, want, true)
	if err != nil {
		return ok, err
	}
	if err := late.Wait(); err != nil {
		Round(ok).WipeShares()
		return nil, err
	}
	return append(ok, late.results...), nil
}

// attest runs a round until want brokers answered (then the rest go on
// behind Late, which keeps their results if keepLate), a lockdown, or the
// end of ctx.
func (c *Client) attest(ctx context.Context, bo Backoff, want int, keepLate bool) ([]*Result, *Late, error) {
	if bo.Initial == 0 {
		bo = Backoff{Initial: 500 * time.Millisecond, Max: 10 * time.Second}
	}
	ctx, cancel := context.WithCancel(ctx)
	answers := c.launch(ctx, bo)
	var ok []*Result
	last := map[string]error{}
	for left := len(c.cfg.Brokers); left > 0; left-- {
		r := <-answers
		if ld := lockdownOf(r); ld != nil {
			cancel()
			Round(ok).WipeShares()
			return nil, nil, ld
		}
		if r.Err != nil {
			last[r.Broker] = r.Err
			continue
		}
		ok = append(ok, r)
		if len(ok) >= want {
			return ok, listenLate(answers, left-1, cancel, keepLate, slices.Clone(ok)), nil
		}
	}
	cancel()
	var errs brokerErrors
	for b, e := range last {
		errs = append(errs, fmt.Errorf("%s: %w", b, e))
	}
	sort.Slice(errs, func(i, j int) bool { return errs[i].Error() < errs[j].Error() })
	return ok, nil, fmt.Errorf("%w: %d of %d brokers answered, %d needed: %w", ErrBelowThreshold, len(ok), len(c.cfg.Brokers), want, errs)
}

// settledRefusal says whether a broker's refusal stands until the boot's
// measurements change or an operator acts (approves the enrollment, the
// image or the firmware; floors only rise): retrying it within one round
// only repeats it. The next round (a few seconds later) asks again.
// Refusals that a retry can cure (a nonce that expired, a TPM answer that
// did not verify, the broker busy) are retried.
func settledRefusal(c api.Code) bool {
	switch c {
	case api.CodeNotApproved, api.CodeNotActivated, api.CodeImage, api.CodeFirmware, api.CodeFloor, api.CodeReplay, api.CodePCRDigest:
		return true
	}
	return false
}

// launch attests to every broker in its own goroutine, retrying until the
// broker answers, its answer is final or ctx ends; each sends its last
// result once on the returned channel, which holds them all.
func (c *Client) launch(ctx context.Context, bo Backoff) <-chan *Result {
	ch := make(chan *Result, len(c.cfg.Brokers))
	for _, b := range c.cfg.Brokers {
		go func() {
			delay := bo.Initial
			for {
				r := c.AttestOnce(ctx, b)
				var be *BrokerError
				// Success, a lockdown order, a broker that does not know
				// this appliance (it must enroll first), or a refusal that
				// no retry within the round can change end the retries: the
				// round is decided as soon as every broker has, and the
				// caller says so at once instead of after the round's time.
				final := errors.As(r.Err, &be) && (be.Lockdown || be.Code == api.CodeUnknownAppliance || settledRefusal(be.Code))
				if r.Err == nil || final || ctx.Err() != nil {
					ch <- r
					return
				}
				c.log.Warn("attestation failed, retrying", "broker", b.Name, "err", r.Err, "retry_in", delay)
				select {
				case <-ctx.Done():
					ch <- r
					return
				case <-time.After(delay):
				}
				delay = min(delay*2, bo.Max)
			}
		}()
	}
	return ch
}

// lockdownOf returns the lockdown order in a broker's answer, or nil.
func lockdownOf(r *Result) *LockdownError {
	var be *BrokerError
	if errors.As(r.Err, &be) && be.Lockdown {
		return &LockdownError{Broker: be.Broker, Reason: be.Message}
	}
	return nil
}

// ErrBelowThreshold means fewer than k brokers released their shares.
var ErrBelowThreshold = errors.New("not enough brokers")

// LockdownError is a broker's order to stop serving and drop the keys.
type LockdownError struct{ Broker, Reason string }

func (e *LockdownError) Error() string {
	return fmt.Sprintf("lockdown ordered by broker %s: %s", e.Broker, e.Reason)
}

// Deposit splits a new disk's unlock secret k-of-n and hands each broker
// its share over mutual TLS with that broker's attested certificate. All n
// brokers must take their share, so that any k can later release it.
func (c *Client) Deposit(ctx context.Context, results []*Result, diskID string, secret []byte) error {
	n := len(c.cfg.Brokers)
	shares, err := shamir.Split(secret, n, c.cfg.Threshold)
	if err != nil {
		return err
	}
	defer func() {
		for i := range shares {
			shares[i].Wipe()
		}
	}()
	certs := map[string]*tls.Certificate{}
	for _, r := range results {
		certs[r.Broker] = r.Certificate
	}
	var errs []error
	for i, b := range c.cfg.Brokers {
		cert := certs[b.Name]
		if cert == nil {
			errs = append(errs, fmt.Errorf("broker %s: no attested certificate (attest to every broker before provisioning)", b.Name))
			continue
		}
		var ok struct{}
		if err := c.post(ctx, b, api.PathDeposit, cert, api.DepositRequest{DiskID: diskID, Share: shares[i].Marshal()}, &ok); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Challenge answers an operator's remote attestation check: a fresh quote
// over ExtraData(nonce, SHA-256 of this appliance's TLS key), the PCR
// values and the event log.
func (c *Client) Challenge(nonce []byte) (*api.ChallengeResponse, error) {
	if len(nonce) < 16 || len(nonce) > 64 {
		return nil, fmt.Errorf("nonce of %d bytes; want 16 to 64", len(nonce))
	}
	evlog, err := c.eventLog()
	if err != nil {
		return nil, err
	}
	h := sha256.Sum256(c.tlsPub)
	c.tpmMu.Lock()
	q, err := c.tpm.Quote(api.ExtraData(nonce, h[:]))
	c.tpmMu.Unlock()
	if err != nil {
		return nil, err
	}
	resp := &api.ChallengeResponse{ApplianceID: c.id, Quote: q.GetQuote(), Signature: q.GetRawSig(), PCRs: map[int][]byte{}, EventLog: evlog}
	for i, v := range q.GetPcrs().GetPcrs() {
		resp.PCRs[int(i)] = v
	}
	return resp, nil
}

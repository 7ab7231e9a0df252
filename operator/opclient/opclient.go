// Package opclient is the operator's client of the key brokers' operator
// API (mutual TLS: a custodian shows each broker the client certificate
// that broker's custodian CA issued), used by embassyctl. brokers.go reads
// the broker list and each broker's credential. Every change is sent to every broker, since each broker
// decides on its own; reads are per broker. agree.go weighs the brokers'
// health reports of an appliance: what decommission and replace act on
// (drained, caught up, nothing lost) holds only where k brokers' fresh
// reports agree, never on one broker's word. AttestAppliance (attest.go)
// checks an appliance's quote directly; render.go prints answers for
// people. It speaks only protocol/ and never links the broker server.
package opclient

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/protocol/api"
)

// Client talks to a set of brokers, each with the credential it accepts.
type Client struct {
	Brokers []Broker
	http    map[string]*http.Client // by broker name
}

// Credential is what the client shows one broker and trusts it with: this
// custodian's client certificate for that broker, and the CA bundle that
// verifies the broker's TLS certificate.
type Credential struct {
	Cert  tls.Certificate
	Roots *x509.CertPool
}

func httpClient(cr Credential) *http.Client {
	return &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: cr.Roots, Certificates: []tls.Certificate{cr.Cert}, MinVersion: tls.VersionTLS13}}}
}

// New makes a client that shows every broker the same certificate and
// verifies them all with brokerCAs (brokers that share one operator CA).
func New(brokers []Broker, cert tls.Certificate, brokerCAs *x509.CertPool) *Client {
	hc := httpClient(Credential{Cert: cert, Roots: brokerCAs})
	c := &Client{Brokers: brokers, http: map[string]*http.Client{}}
	for _, b := range brokers {
		c.http[b.Name] = hc
	}
	return c
}

// NewPerBroker makes a client that shows each broker its own credential:
// creds[i] is for brokers[i] (a custodian holds one per broker, and each
// broker accepts only its own custodians').
func NewPerBroker(brokers []Broker, creds []Credential) (*Client, error) {
	if len(creds) != len(brokers) {
		return nil, fmt.Errorf("%d credentials for %d brokers", len(creds), len(brokers))
	}
	c := &Client{Brokers: brokers, http: map[string]*http.Client{}}
	for i, b := range brokers {
		c.http[b.Name] = httpClient(creds[i])
	}
	return c, nil
}

// ErrCredentialRefused is a broker refusing the client certificate shown
// to it (401 unauthenticated, or at the TLS handshake): not one its
// custodian CA issued (the credential of another broker, or a shared
// operator certificate), or a revoked custodian's.
var ErrCredentialRefused = errors.New("the broker refused this client certificate")

// refusedHandshake reports whether err is the broker's TLS alert about
// the client certificate (TLS 1.3 delivers it at the first read).
func refusedHandshake(err error) bool {
	var op *net.OpError
	if !errors.As(err, &op) || op.Op != "remote error" {
		return false
	}
	msg := op.Err.Error()
	for _, alert := range []string{"bad certificate", "unknown certificate authority", "certificate required",
		"certificate revoked", "certificate expired", "unsupported certificate", "access denied"} {
		if strings.Contains(msg, alert) {
			return true
		}
	}
	return false
}

func (c *Client) do(ctx context.Context, b Broker, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		data, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimSuffix(b.URL, "/")+path, body)
	if err != nil {
		return err
	}
	hc := c.http[b.Name]
	if hc == nil {
		return fmt.Errorf("broker %s: no credential for it", b.Name)
	}
	resp, err := hc.Do(req)
	if refusedHandshake(err) {
		return &BrokerError{Broker: b.Name, Code: api.CodeUnauthenticated,
			Message: fmt.Sprintf("%v (%v); use the custodian certificate this broker's custodian CA issued (embassyctl brokers add %s URL --cert FILE --key FILE)", ErrCredentialRefused, err, b.Name),
			Err:     ErrCredentialRefused}
	}
	if err != nil {
		return fmt.Errorf("broker %s: %w", b.Name, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("broker %s: %w", b.Name, err)
	}
	if resp.StatusCode != http.StatusOK {
		var e api.Error
		json.Unmarshal(data, &e)
		if e.Error == "" {
			e.Error = resp.Status
		}
		be := &BrokerError{Broker: b.Name, Status: resp.StatusCode, Code: e.Code, Message: e.Error}
		if resp.StatusCode == http.StatusUnauthorized && e.Code == api.CodeUnauthenticated {
			be.Err = ErrCredentialRefused
			be.Message += fmt.Sprintf("; use the custodian certificate this broker's custodian CA issued (embassyctl brokers add %s URL --cert FILE --key FILE)", b.Name)
		}
		return be
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("broker %s: decode answer: %w", b.Name, err)
		}
	}
	return nil
}

// BrokerError is a broker's refusal: its HTTP status, its machine-readable
// code (branch on it with errors.As, never on the text) and its text.
// A refused client certificate is a BrokerError with code
// api.CodeUnauthenticated (status 401, or 0 when the TLS handshake failed)
// and Err ErrCredentialRefused.
type BrokerError struct {
	Broker  string
	Status  int
	Code    api.Code
	Message string
	Err     error // ErrCredentialRefused, or nil
}

func (e *BrokerError) Error() string { return fmt.Sprintf("broker %s: %s", e.Broker, e.Message) }
func (e *BrokerError) Unwrap() error { return e.Err }

// Outcome is one broker's answer to a change.
type Outcome struct {
	Broker string   `json:"broker"`
	OK     bool     `json:"ok"`
	Code   api.Code `json:"code,omitempty"`
	Error  string   `json:"error,omitempty"`
}

// each sends the same change to every broker and collects the outcomes;
// the error names every broker that refused.
func (c *Client) each(ctx context.Context, method, path string, in any) ([]Outcome, error) {
	var out []Outcome
	var errs []error
	for _, b := range c.Brokers {
		err := c.do(ctx, b, method, path, in, nil)
		if err != nil {
			errs = append(errs, err)
		}
		out = append(out, outcome(b, err))
	}
	return out, errors.Join(errs...)
}

// outcome is broker b's answer to a change: ok, or the error and its code.
func outcome(b Broker, err error) Outcome {
	o := Outcome{Broker: b.Name, OK: err == nil}
	if err != nil {
		o.Error = err.Error()
		var be *BrokerError
		if errors.As(err, &be) {
			o.Code = be.Code
		}
	}
	return o
}

// ApproveEnrollment approves an activated appliance on every broker.
func (c *Client) ApproveEnrollment(ctx context.Context, id string) ([]Outcome, error) {
	if err := api.CheckApplianceID(id); err != nil {
		return nil, err
	}
	return c.each(ctx, http.MethodPost, api.PathEnrollments+"/"+id+"/approve", struct{}{})
}

// ApproveImage approves a signed manifest on every broker.
func (c *Client) ApproveImage(ctx context.Context, manifest, sig []byte) ([]Outcome, error) {
	return c.each(ctx, http.MethodPost, api.PathManifests, api.ApproveManifestRequest{Manifest: manifest, Signature: sig})
}

// SetFloor sets the minimum image version of an appliance.
func (c *Client) SetFloor(ctx context.Context, id string, version uint64) ([]Outcome, error) {
	if err := api.CheckApplianceID(id); err != nil {
		return nil, err
	}
	return c.each(ctx, http.MethodPost, api.PathAppliances+id+"/floor", api.FloorRequest{Version: version})
}

// ApproveDisks approves provisioning of count new disks.
func (c *Client) ApproveDisks(ctx context.Context, id string, count int) ([]Outcome, error) {
	if err := api.CheckApplianceID(id); err != nil {
		return nil, err
	}
	return c.each(ctx, http.MethodPost, api.PathAppliances+id+"/disks", api.DiskApprovalRequest{Count: count})
}

// SetEndpoints records, on every broker, the endpoints (IP:port, one per
// network path) the appliance's peers replicate to.
func (c *Client) SetEndpoints(ctx context.Context, id string, endpoints []string) ([]Outcome, error) {
	if err := api.CheckApplianceID(id); err != nil {
		return nil, err
	}
	if len(endpoints) == 0 || len(endpoints) > api.MaxEndpoints {
		return nil, fmt.Errorf("give 1 to %d endpoints", api.MaxEndpoints)
	}
	for _, e := range endpoints {
		if err := api.CheckEndpoint(e); err != nil {
			return nil, err
		}
	}
	return c.each(ctx, http.MethodPost, api.PathAppliances+id+"/endpoints", api.EndpointsRequest{Endpoints: endpoints})
}

// ApproveFirmware adopts, on every broker, the appliance's pending firmware
// (the platform measurement of its boot refused with code firmware) as its
// new firmware reference. A broker with nothing pending refuses with
// api.CodeNoPendingFirmware.
func (c *Client) ApproveFirmware(ctx context.Context, id, digest string) ([]Outcome, error) {
	if err := api.CheckApplianceID(id); err != nil {
		return nil, err
	}
	return c.each(ctx, http.MethodPost, api.PathAppliances+id+"/firmware", api.FirmwareApproval{Digest: digest})
}

// RejectFirmware discards the pending firmware measurement with the given
// digest on every broker (api.CodeFirmwareDigest where another one is
// pending).
func (c *Client) RejectFirmware(ctx context.Context, id, digest string) ([]Outcome, error) {
	if err := api.CheckApplianceID(id); err != nil {
		return nil, err
	}
	return c.each(ctx, http.MethodPost, api.PathAppliances+id+"/firmware-reject", api.FirmwareApproval{Digest: digest})
}

// FirmwareState is one broker's firmware view of an appliance: whether it
// holds a reference and the pending change, or the error reading it.
type FirmwareState struct {
	Broker    string               `json:"broker"`
	Reference bool                 `json:"firmware_reference"`
	Pending   *api.PendingFirmware `json:"pending_firmware,omitempty"`
	Error     string               `json:"error,omitempty"`
}

// Firmware reads every broker's firmware view of appliance id, to show
// what approve-firmware would adopt.
func (c *Client) Firmware(ctx context.Context, id string) []FirmwareState {
	var out []FirmwareState
	for _, s := range c.Status(ctx) {
		fs := FirmwareState{Broker: s.Broker, Error: s.Error}
		if s.State != nil {
			fs.Error = "appliance " + id + " unknown"
			for _, a := range s.State.Appliances {
				if a.ID == id {
					fs.Error, fs.Reference, fs.Pending = "", a.FirmwareReference, a.PendingFirmware
				}
			}
		}
		out = append(out, fs)
	}
	return out
}

// Revoke revokes an appliance on every broker.
func (c *Client) Revoke(ctx context.Context, id string) ([]Outcome, error) {
	if err := api.CheckApplianceID(id); err != nil {
		return nil, err
	}
	return c.each(ctx, http.MethodPost, api.PathAppliances+id+"/revoke", struct{}{})
}

// Destruction is one broker's answer to destroy-shares: the disk ids whose
// shares it deleted, or why it refused.
type Destruction struct {
	Outcome
	Destroyed []string `json:"destroyed"`
}

// DestroyShares deletes, on every broker, the shares it holds for a revoked
// appliance (brokers refuse with api.CodeNotRevoked otherwise). The error
// names every broker that refused.
func (c *Client) DestroyShares(ctx context.Context, id string) ([]Destruction, error) {
	if err := api.CheckApplianceID(id); err != nil {
		return nil, err
	}
	var out []Destruction
	var errs []error
	for _, b := range c.Brokers {
		var resp api.DestroySharesResponse
		err := c.do(ctx, b, http.MethodPost, api.PathAppliances+id+"/destroy-shares", struct{}{}, &resp)
		if err != nil {
			errs = append(errs, err)
		}
		out = append(out, Destruction{Outcome: outcome(b, err), Destroyed: resp.Destroyed})
	}
	return out, errors.Join(errs...)
}

// BrokerState is one broker's state or the error reading it.
type BrokerState struct {
	Broker string     `json:"broker"`
	State  *api.State `json:"state,omitempty"`
	Error  string     `json:"error,omitempty"`
}

// Status reads every broker's state.
func (c *Client) Status(ctx context.Context) []BrokerState {
	var out []BrokerState
	for _, b := range c.Brokers {
		var st api.State
		if err := c.do(ctx, b, http.MethodGet, api.PathState, nil, &st); err != nil {
			out = append(out, BrokerState{Broker: b.Name, Error: err.Error()})
			continue
		}
		out = append(out, BrokerState{Broker: b.Name, State: &st})
	}
	return out
}

// AuditLog is one broker's audit log and its verification.
type AuditLog struct {
	Broker   string            `json:"broker"`
	Entries  []audit.Entry     `json:"entries,omitempty"`
	Head     audit.Head        `json:"head"`
	Signed   *audit.SignedHead `json:"signed_head,omitempty"`
	Verified bool              `json:"verified"`
	Error    string            `json:"error,omitempty"`
}

// Audit fetches every broker's log and verifies its chain against the
// broker's recorded head.
func (c *Client) Audit(ctx context.Context) []AuditLog {
	var out []AuditLog
	for _, b := range c.Brokers {
		var ar audit.Response
		if err := c.do(ctx, b, http.MethodGet, api.PathAudit, nil, &ar); err != nil {
			out = append(out, AuditLog{Broker: b.Name, Error: err.Error()})
			continue
		}
		l := AuditLog{Broker: b.Name, Entries: ar.Entries, Head: ar.Head, Signed: ar.Signed}
		if _, err := audit.Verify(ar.Entries, &ar.Head); err != nil {
			l.Error = err.Error()
		} else {
			l.Verified = true
		}
		out = append(out, l)
	}
	return out
}

// Package opclient is the operator's client of the key brokers' operator
// API (mutual TLS with a home-state operator certificate), used by
// embassyctl. Every change is sent to every broker, since each broker
// decides on its own; reads are per broker. AttestAppliance (attest.go)
// checks an appliance's quote directly; render.go prints answers for
// people. It speaks only protocol/ and never links the broker server.
package opclient

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/protocol/api"
)

// Broker names a broker's operator endpoint and pins its audit signing
// public key (ed25519, 32 bytes; base64 in the JSON list), which
// VerifyHeads checks the broker's signed audit heads with.
type Broker struct {
	Name     string `json:"name"`
	URL      string `json:"url"`
	AuditKey []byte `json:"audit_key,omitempty"`
}

// LoadBrokers reads a JSON list of brokers.
func LoadBrokers(path string) ([]Broker, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read broker list: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var out []Broker
	if err := dec.Decode(&out); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s lists no broker", path)
	}
	for _, br := range out {
		if br.Name == "" || !strings.HasPrefix(br.URL, "https://") {
			return nil, fmt.Errorf("%s: broker %q needs a name and an https URL", path, br.Name)
		}
		if len(br.AuditKey) != 0 && len(br.AuditKey) != ed25519.PublicKeySize {
			return nil, fmt.Errorf("%s: broker %q: audit_key is %d bytes, want an ed25519 public key (%d)", path, br.Name, len(br.AuditKey), ed25519.PublicKeySize)
		}
	}
	return out, nil
}

// Client talks to a set of brokers.
type Client struct {
	Brokers []Broker
	http    *http.Client
}

// New makes a client with the operator certificate and the broker CA.
func New(brokers []Broker, cert tls.Certificate, brokerCAs *x509.CertPool) *Client {
	return &Client{Brokers: brokers, http: &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: brokerCAs, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}}}}
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
	resp, err := c.http.Do(req)
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
		return &BrokerError{Broker: b.Name, Status: resp.StatusCode, Code: e.Code, Message: e.Error}
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
type BrokerError struct {
	Broker  string
	Status  int
	Code    api.Code
	Message string
}

func (e *BrokerError) Error() string { return fmt.Sprintf("broker %s: %s", e.Broker, e.Message) }

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
		o := Outcome{Broker: b.Name, OK: err == nil}
		if err != nil {
			o.Error = err.Error()
			var be *BrokerError
			if errors.As(err, &be) {
				o.Code = be.Code
			}
			errs = append(errs, err)
		}
		out = append(out, o)
	}
	return out, errors.Join(errs...)
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
		d := Destruction{Outcome: Outcome{Broker: b.Name, OK: err == nil}, Destroyed: resp.Destroyed}
		if err != nil {
			d.Error = err.Error()
			var be *BrokerError
			if errors.As(err, &be) {
				d.Code = be.Code
			}
			errs = append(errs, err)
		}
		out = append(out, d)
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

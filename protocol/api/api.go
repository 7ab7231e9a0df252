// Package api defines the JSON messages of the key broker's two HTTPS APIs:
// the appliance API (nonce, enrollment, attestation, share deposit) and the
// operator API (enrollment approval, image approval, floor, disk approval,
// revocation, state, audit). Both broker and clients use these types.
package api

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"net"
	"regexp"
	"strconv"
	"time"

	"github.com/dataembassy/embassy/images/manifest"
)

// Appliance API paths.
const (
	PathEnroll   = "/v1/appliance/enroll"
	PathActivate = "/v1/appliance/activate"
	PathNonce    = "/v1/appliance/nonce"
	PathAttest   = "/v1/appliance/attest"
	PathDeposit  = "/v1/appliance/deposit"
)

// Operator API paths.
const (
	PathEnrollments = "/v1/enrollments" // GET list; POST {id}/approve
	PathManifests   = "/v1/manifests"   // POST approve
	PathAppliances  = "/v1/appliances/" // POST {id}/floor, {id}/disks, {id}/revoke, {id}/endpoints
	PathState       = "/v1/state"       // GET
	PathAudit       = "/v1/audit"       // GET
)

// MaxBody bounds every request body.
const MaxBody = 4 << 20

var applianceID = regexp.MustCompile(`^[0-9a-f]{32}$`)

// ApplianceID derives an appliance's identity from its EK public key.
func ApplianceID(ekPublicDER []byte) string {
	sum := sha256.Sum256(ekPublicDER)
	return hex.EncodeToString(sum[:16])
}

// ApplianceIDFromKey derives the identity from a parsed EK.
func ApplianceIDFromKey(ek any) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(ek)
	if err != nil {
		return "", err
	}
	return ApplianceID(der), nil
}

// CheckApplianceID validates an appliance id.
func CheckApplianceID(id string) error {
	if !applianceID.MatchString(id) {
		return fmt.Errorf("appliance id %q is not 32 lowercase hex digits", id)
	}
	return nil
}

// ExtraData binds a quote to a broker nonce and the appliance's ephemeral
// TLS key: SHA-256("embassy-attest-v1" || nonce || SHA-256(TLS public key)).
func ExtraData(nonce, tlsKeySHA256 []byte) []byte {
	h := sha256.New()
	h.Write([]byte("embassy-attest-v1"))
	h.Write(nonce)
	h.Write(tlsKeySHA256)
	return h.Sum(nil)
}

// ReasonUnknownAppliance is the refusal an appliance that was never
// enrolled gets; it then asks to enroll.
const ReasonUnknownAppliance = "unknown appliance"

// Error is the body of every non-2xx answer.
type Error struct {
	Error string `json:"error"`
	// Lockdown tells an appliance to stop serving and drop its keys.
	Lockdown bool `json:"lockdown,omitempty"`
}

// EnrollRequest is sent by an appliance at home, before shipping.
type EnrollRequest struct {
	EKPublic []byte `json:"ek_public"` // PKIX DER
	EKCert   []byte `json:"ek_cert"`   // DER, from the TPM's NV RAM
	AKPublic []byte `json:"ak_public"` // TPMT_PUBLIC
}

// EnrollChallenge asks the appliance's TPM to prove the AK sits beside the EK.
type EnrollChallenge struct {
	ApplianceID     string `json:"appliance_id"`
	CredentialBlob  []byte `json:"credential_blob"`
	EncryptedSecret []byte `json:"encrypted_secret"`
}

// ActivateRequest answers the challenge.
type ActivateRequest struct {
	ApplianceID string `json:"appliance_id"`
	Secret      []byte `json:"secret"`
}

// NonceRequest asks for a single-use nonce.
type NonceRequest struct {
	ApplianceID string `json:"appliance_id"`
}

// NonceResponse carries the nonce.
type NonceResponse struct {
	Nonce   []byte    `json:"nonce"`
	Expires time.Time `json:"expires"`
}

// AttestRequest is the appliance's evidence.
type AttestRequest struct {
	ApplianceID string         `json:"appliance_id"`
	Nonce       []byte         `json:"nonce"`
	Quote       []byte         `json:"quote"`     // TPMS_ATTEST
	Signature   []byte         `json:"signature"` // TPMT_SIGNATURE
	PCRs        map[int][]byte `json:"pcrs"`
	EventLog    []byte         `json:"event_log"`
	TLSPublic   []byte         `json:"tls_public_key"` // PKIX DER of the ephemeral TLS key
	// TLSAddresses are the IP addresses clients reach the appliance at
	// (from its measured image config), put in the certificate.
	TLSAddresses []string `json:"tls_addresses,omitempty"`
	// Health is the appliance's own report of its disks and replication
	// peers, shown to operators. It is informational: nothing is released
	// because of it.
	Health *Health `json:"health,omitempty"`
}

// Health is what an appliance reports about itself at each attestation.
type Health struct {
	Degraded bool         `json:"degraded"`
	Disks    []DiskHealth `json:"disks,omitempty"`
	// BlankDisks are inserted disks waiting for an operator's approve-disk.
	BlankDisks []DiskHealth `json:"blank_disks,omitempty"`
	Peers      []PeerHealth `json:"peers,omitempty"`
	Reported   time.Time    `json:"reported"`
}

// DiskHealth is one disk of an appliance.
type DiskHealth struct {
	Serial     string `json:"serial"`
	Device     string `json:"device,omitempty"`
	UUID       string `json:"uuid,omitempty"`
	State      string `json:"state"`
	Reason     string `json:"reason,omitempty"`
	ReadErrors int64  `json:"read_errors"`
	Healed     int64  `json:"healed"`
}

// PeerHealth is the replication lag towards one peer.
type PeerHealth struct {
	ID             string  `json:"id"`
	Path           string  `json:"path,omitempty"` // endpoint in use
	PendingObjects int     `json:"pending_objects"`
	PendingBytes   int64   `json:"pending_bytes"`
	OldestSeconds  float64 `json:"oldest_pending_seconds"`
	LastError      string  `json:"last_error,omitempty"`
}

// MaxHealthItems bounds each list in a health report.
const MaxHealthItems = 64

// Validate bounds a health report.
func (h *Health) Validate() error {
	if len(h.Disks) > MaxHealthItems || len(h.BlankDisks) > MaxHealthItems || len(h.Peers) > MaxHealthItems {
		return fmt.Errorf("health report lists more than %d items", MaxHealthItems)
	}
	return nil
}

// Peer is another appliance of the same embassy, as the brokers know it:
// its identity (the CN of its attested certificate) and the endpoints
// (host:port, one per path) it is reached at.
type Peer struct {
	ID        string   `json:"id"`
	Endpoints []string `json:"endpoints"`
}

// EndpointsRequest sets the endpoints peers reach an appliance at.
type EndpointsRequest struct {
	Endpoints []string `json:"endpoints"`
}

// MaxEndpoints bounds an appliance's endpoint list.
const MaxEndpoints = 8

// SealedShare is one volume key share sealed to the appliance's EK and PCRs.
type SealedShare struct {
	DiskID string `json:"disk_id"`
	Blob   []byte `json:"blob"` // go-tpm-tools ImportBlob, protobuf
}

// AttestResponse releases the shares and the attested TLS certificate.
type AttestResponse struct {
	ImageVersion  uint64        `json:"image_version"`
	Shares        []SealedShare `json:"shares"`
	Certificate   [][]byte      `json:"certificate"` // DER chain: leaf, service CA
	CertExpires   time.Time     `json:"cert_expires"`
	DiskApprovals int           `json:"disk_approvals"`
	ReattestAfter int           `json:"reattest_after_seconds"`
	// Peers are the other enrolled, unrevoked appliances with endpoints.
	Peers []Peer `json:"peers,omitempty"`
}

// DepositRequest hands the broker its share of a new disk's key. It must
// come over mutual TLS with the appliance's attested certificate.
type DepositRequest struct {
	DiskID string `json:"disk_id"`
	Share  []byte `json:"share"` // shamir encoding
}

// ApproveManifestRequest approves a signed image manifest.
type ApproveManifestRequest struct {
	Manifest  []byte `json:"manifest"`
	Signature []byte `json:"signature"`
}

// FloorRequest sets an appliance's minimum image version.
type FloorRequest struct {
	Version uint64 `json:"version"`
}

// DiskApprovalRequest approves provisioning of new disks.
type DiskApprovalRequest struct {
	Count int `json:"count"`
}

// PathChallenge is the appliance's own endpoint (on its ingest listener)
// where an operator asks for a fresh quote.
const PathChallenge = "/_embassy/attest"

// ChallengeRequest carries the operator's nonce.
type ChallengeRequest struct {
	Nonce []byte `json:"nonce"`
}

// ChallengeResponse is the appliance's evidence for an operator: a quote
// whose extraData is ExtraData(nonce, SHA-256 of the TLS key serving the
// connection), its PCR values and the event log.
type ChallengeResponse struct {
	ApplianceID string         `json:"appliance_id"`
	Quote       []byte         `json:"quote"`
	Signature   []byte         `json:"signature"`
	PCRs        map[int][]byte `json:"pcrs"`
	EventLog    []byte         `json:"event_log"`
}

// Appliance is the broker's record of one appliance.
type Appliance struct {
	ID              string    `json:"id"`
	AKPublic        []byte    `json:"ak_public"`
	EKFingerprint   string    `json:"ek_fingerprint"`
	Activated       bool      `json:"activated"`
	Enrolled        bool      `json:"enrolled"`
	Revoked         bool      `json:"revoked"`
	Floor           uint64    `json:"floor"`
	DiskApprovals   int       `json:"disk_approvals"`
	Disks           []string  `json:"disks"`
	ResetCount      uint32    `json:"reset_count"`
	RestartCount    uint32    `json:"restart_count"`
	LastAttestation time.Time `json:"last_attestation,omitempty"`
	LastImage       uint64    `json:"last_image_version,omitempty"`
	Endpoints       []string  `json:"endpoints,omitempty"`
	Health          *Health   `json:"health,omitempty"`
}

// ApprovedManifest is one approved image.
type ApprovedManifest struct {
	Version      uint64                `json:"version"`
	Approved     time.Time             `json:"approved"`
	Kernel       string                `json:"kernel"`
	Measurements manifest.Measurements `json:"measurements"`
}

// State is the operator's view of a broker.
type State struct {
	Broker     string             `json:"broker"`
	Appliances []Appliance        `json:"appliances"`
	Manifests  []ApprovedManifest `json:"manifests"`
}

// CheckEndpoint validates a peer endpoint: "IP:port".
func CheckEndpoint(e string) error {
	host, port, err := net.SplitHostPort(e)
	if err != nil {
		return fmt.Errorf("endpoint %q: %w", e, err)
	}
	if net.ParseIP(host) == nil {
		return fmt.Errorf("endpoint %q: host is not an IP address", e)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("endpoint %q: bad port", e)
	}
	return nil
}

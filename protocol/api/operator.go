package api

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/dataembassy/embassy/images/manifest"
)

// Operator API paths.
const (
	PathEnrollments = "/v1/enrollments" // GET list; POST {id}/approve
	PathManifests   = "/v1/manifests"   // POST approve
	PathAppliances  = "/v1/appliances/" // POST {id}/floor, {id}/disks, {id}/revoke, {id}/destroy-shares, {id}/endpoints, {id}/firmware
	PathState       = "/v1/state"       // GET
	PathAudit       = "/v1/audit"       // GET
	PathMetrics     = "/metrics"        // GET, Prometheus exposition format
)

// EndpointsRequest sets the endpoints peers reach an appliance at.
type EndpointsRequest struct {
	Endpoints []string `json:"endpoints"`
}

// MaxEndpoints bounds an appliance's endpoint list.
const MaxEndpoints = 8

// ApproveManifestRequest approves a signed image manifest.
type ApproveManifestRequest struct {
	Manifest  []byte `json:"manifest"`
	Signature []byte `json:"signature"`
}

// FloorRequest sets an appliance's minimum image version.
type FloorRequest struct {
	Version uint64 `json:"version"`
}

// DestroySharesResponse lists the disks whose shares a broker destroyed.
type DestroySharesResponse struct {
	Destroyed []string `json:"destroyed"`
}

// DiskApprovalRequest approves provisioning of new disks.
type DiskApprovalRequest struct {
	Count int `json:"count"`
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
	// FirmwareReference says whether the broker holds the platform PCRs'
	// reference (recorded at activation or adopted by approve-firmware);
	// without one the appliance is refused with CodeFirmware.
	FirmwareReference bool `json:"firmware_reference"`
	// PendingFirmware is the platform measurement of a boot refused with
	// CodeFirmware, waiting for an operator's approve-firmware.
	PendingFirmware *PendingFirmware `json:"pending_firmware,omitempty"`
}

// PendingFirmware is a refused boot's platform measurement as a broker
// keeps it for approve-firmware: which platform PCRs differ from the
// reference (all of them when there is none) and how their events differ.
type PendingFirmware struct {
	Recorded time.Time `json:"recorded"`
	// Digest names exactly this measurement (FirmwareDigest of its PCR
	// values): approve-firmware adopts it only when the operator passes
	// the same digest, so what was reviewed is what gets adopted.
	Digest      string   `json:"digest"`
	PCRs        []int    `json:"pcrs"`
	Differences []string `json:"differences"`
}

// FirmwareApproval is the body of approve-firmware: the digest of the
// pending measurement the operator reviewed.
type FirmwareApproval struct {
	Digest string `json:"digest"`
}

// FirmwareDigest names a platform measurement: SHA-256 over a domain tag
// and, for each PCR index in order, the index and its value.
func FirmwareDigest(indexes []int, values map[int][]byte) string {
	h := sha256.New()
	h.Write([]byte("embassy-firmware-v1\x00"))
	for _, i := range indexes {
		h.Write([]byte{byte(i)})
		h.Write(values[i])
	}
	return hex.EncodeToString(h.Sum(nil))
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

package api

import (
	"time"
)

// Appliance API paths.
const (
	PathEnroll   = "/v1/appliance/enroll"
	PathActivate = "/v1/appliance/activate"
	PathNonce    = "/v1/appliance/nonce"
	PathAttest   = "/v1/appliance/attest"
	PathDeposit  = "/v1/appliance/deposit"
)

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

// ActivateRequest answers the challenge, with the platform's evidence the
// broker records as the appliance's firmware reference: a quote by the
// just-activated AK over the policy PCRs (package tpm/pcrs) whose
// extraData is ActivationExtraData(Secret), and the raw event log.
type ActivateRequest struct {
	ApplianceID string         `json:"appliance_id"`
	Secret      []byte         `json:"secret"`
	Quote       []byte         `json:"quote,omitempty"`     // TPMS_ATTEST
	Signature   []byte         `json:"signature,omitempty"` // TPMT_SIGNATURE
	PCRs        map[int][]byte `json:"pcrs,omitempty"`
	EventLog    []byte         `json:"event_log,omitempty"`
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
	// Disks are the LUKS UUIDs of the disks in the appliance's own format
	// that it found (at most MaxRequestDisks). A broker releases what it
	// holds regardless; for each listed disk it holds no share of this
	// appliance for, it audits why (another appliance's disk, shares
	// destroyed at a decommission, unknown here), so a disk moved into
	// another server shows at every broker why it stays locked.
	Disks []string `json:"disks,omitempty"`
}

// MaxRequestDisks bounds AttestRequest.Disks.
const MaxRequestDisks = 16

// Peer is another appliance of the same embassy, as the brokers know it:
// its identity (the CN of its attested certificate) and the endpoints
// (host:port, one per path) it is reached at.
type Peer struct {
	ID        string   `json:"id"`
	Endpoints []string `json:"endpoints"`
}

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
	// Approved are the images this broker approved (newest first, at most
	// MaxApprovedImages): an appliance takes a pushed upgrade only if k
	// brokers list it.
	Approved []ApprovedImage `json:"approved_images,omitempty"`
	// Floor is the appliance's floor at this broker after this attestation.
	Floor uint64 `json:"floor"`
}

// MaxApprovedImages bounds AttestResponse.Approved.
const MaxApprovedImages = 16

// ApprovedImage names an approved image by its signed version and the UKI
// digest its manifest predicts for PCR4.
type ApprovedImage struct {
	Version         uint64 `json:"version"`
	UKIAuthenticode string `json:"pcr4_uki_authenticode"`
}

// DepositRequest hands the broker its share of a new disk's key. It must
// come over mutual TLS with the appliance's attested certificate.
type DepositRequest struct {
	DiskID string `json:"disk_id"`
	Share  []byte `json:"share"` // shamir encoding
}

package api

// Error is the body of every non-2xx answer.
type Error struct {
	// Code says, for programs, why the request was refused; callers
	// branch on it, never on the text.
	Code Code `json:"code"`
	// Error says the same for people, with details.
	Error string `json:"error"`
	// Lockdown tells an appliance to stop serving and drop its keys.
	Lockdown bool `json:"lockdown,omitempty"`
}

// Code is the machine-readable reason of a refusal. Its values are stable:
// they are part of the API.
type Code string

// Codes of refusals. Each broker refusal reason has one.
const (
	CodeUnknownAppliance   Code = "unknown_appliance"
	CodeAlreadyEnrolled    Code = "already_enrolled"
	CodeNotActivated       Code = "not_activated"
	CodeNotApproved        Code = "not_approved"
	CodeRevoked            Code = "revoked"
	CodeEKRevoked          Code = "ek_revoked"
	CodeNonceUnknown       Code = "nonce_unknown"
	CodeNonceExpired       Code = "nonce_expired"
	CodeTooManyNonces      Code = "too_many_nonces"
	CodeQuote              Code = "bad_quote"
	CodePCRDigest          Code = "pcr_digest_mismatch"
	CodeBinding            Code = "bad_binding"
	CodeClock              Code = "clock_unsafe"
	CodeRollback           Code = "rollback"
	CodeReplay             Code = "event_log_mismatch"
	CodeImage              Code = "unapproved_image"
	CodeFirmware           Code = "firmware"
	CodeFloor              Code = "below_floor"
	CodeFloorDown          Code = "floor_lowered"
	CodeBadRequest         Code = "bad_request"
	CodeEKCert             Code = "untrusted_ek_cert"
	CodeAK                 Code = "bad_ak"
	CodeActivation         Code = "activation_failed"
	CodeActivationEvidence Code = "bad_activation_evidence"
	CodeManifestSignature  Code = "bad_manifest_signature"
	CodeManifestConflict   Code = "manifest_conflict"
	CodeNoDiskApproval     Code = "no_disk_approval"
	CodeDiskExists         Code = "disk_exists"
	CodeNoPendingFirmware  Code = "no_pending_firmware"
	CodeFirmwareDigest     Code = "firmware_digest"
	CodeNotRevoked         Code = "not_revoked"
	CodeUnauthenticated    Code = "unauthenticated"
	CodeInternal           Code = "internal"
)

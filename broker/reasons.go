package broker

import (
	"errors"
	"net/http"

	"github.com/dataembassy/embassy/protocol/api"
)

// Reasons a request is refused; each appears verbatim in the audit log and
// in the answer's text. Programs read the answer's code (Rejection.Code).
const (
	ReasonUnknownAppliance   = "unknown appliance"
	ReasonAlreadyEnrolled    = "appliance already enrolled"
	ReasonNotActivated       = "AK was never activated"
	ReasonNotEnrolled        = "enrollment not approved by an operator"
	ReasonRevoked            = "appliance revoked"
	ReasonEKRevoked          = "EK revoked: a revoked appliance never enrolls again"
	ReasonNonceUnknown       = "nonce unknown or already used"
	ReasonNonceExpired       = "nonce expired"
	ReasonTooManyNonces      = "too many outstanding nonces"
	ReasonQuote              = "quote signature does not verify with the appliance's AK"
	ReasonPCRDigest          = "PCR values do not match the quoted digest"
	ReasonBinding            = "quote extraData does not bind this nonce and TLS key"
	ReasonClock              = "TPM clock not marked safe"
	ReasonRollback           = "TPM reset or restart count went backwards (state rollback)"
	ReasonReplay             = "event log does not replay to the quoted PCRs"
	ReasonImage              = "measured boot matches no approved image"
	ReasonFirmware           = "platform firmware measurements differ from the appliance's reference"
	ReasonFloor              = "image version below the appliance's floor"
	ReasonFloorDown          = "an appliance's floor only goes up"
	ReasonBadRequest         = "malformed request"
	ReasonEKCert             = "EK certificate does not chain to a trusted manufacturer"
	ReasonAK                 = "AK is not a restricted TPM signing key"
	ReasonActivation         = "credential activation answer is wrong"
	ReasonActivationEvidence = "activation carries no valid quote and event log of the platform"
	ReasonNoPendingFirmware  = "no refused firmware measurement is pending approval"
	ReasonFirmwareDigest     = "the pending firmware measurement is not the one the operator reviewed"
	ReasonNotRevoked         = "shares are destroyed only for a revoked appliance"
	ReasonManifestSig        = "manifest signature does not verify with the image-signing key"
	ReasonManifestConflict   = "another manifest with this version is approved"
	ReasonNoDiskApproval     = "no approved disk provisioning pending"
	ReasonDiskExists         = "a share for this disk is already deposited"
	ReasonNotAttested        = "attested client certificate required"
	ReasonNoOperatorCert     = "operator client certificate required"
	ReasonNotCustodian       = "client certificate is not one of this broker's custodians'"
)

// Rejection is a refused request: the reason, the HTTP status and whether
// the appliance must lock down.
type Rejection struct {
	Reason   string
	Detail   string
	Status   int
	Lockdown bool
}

func (r *Rejection) Error() string {
	if r.Detail != "" {
		return r.Reason + ": " + r.Detail
	}
	return r.Reason
}

// Code is the machine-readable code of the rejection's reason
// (api.CodeInternal for a reason that has none).
func (r *Rejection) Code() api.Code {
	switch r.Reason {
	case ReasonUnknownAppliance:
		return api.CodeUnknownAppliance
	case ReasonAlreadyEnrolled:
		return api.CodeAlreadyEnrolled
	case ReasonNotActivated:
		return api.CodeNotActivated
	case ReasonNotEnrolled:
		return api.CodeNotApproved
	case ReasonRevoked:
		return api.CodeRevoked
	case ReasonEKRevoked:
		return api.CodeEKRevoked
	case ReasonNonceUnknown:
		return api.CodeNonceUnknown
	case ReasonNonceExpired:
		return api.CodeNonceExpired
	case ReasonTooManyNonces:
		return api.CodeTooManyNonces
	case ReasonQuote:
		return api.CodeQuote
	case ReasonPCRDigest:
		return api.CodePCRDigest
	case ReasonBinding:
		return api.CodeBinding
	case ReasonClock:
		return api.CodeClock
	case ReasonRollback:
		return api.CodeRollback
	case ReasonReplay:
		return api.CodeReplay
	case ReasonImage:
		return api.CodeImage
	case ReasonFirmware:
		return api.CodeFirmware
	case ReasonFloor:
		return api.CodeFloor
	case ReasonFloorDown:
		return api.CodeFloorDown
	case ReasonBadRequest:
		return api.CodeBadRequest
	case ReasonEKCert:
		return api.CodeEKCert
	case ReasonAK:
		return api.CodeAK
	case ReasonActivation:
		return api.CodeActivation
	case ReasonActivationEvidence:
		return api.CodeActivationEvidence
	case ReasonNoPendingFirmware:
		return api.CodeNoPendingFirmware
	case ReasonFirmwareDigest:
		return api.CodeFirmwareDigest
	case ReasonNotRevoked:
		return api.CodeNotRevoked
	case ReasonManifestSig:
		return api.CodeManifestSignature
	case ReasonManifestConflict:
		return api.CodeManifestConflict
	case ReasonNoDiskApproval:
		return api.CodeNoDiskApproval
	case ReasonDiskExists:
		return api.CodeDiskExists
	case ReasonNotAttested, ReasonNoOperatorCert, ReasonNotCustodian:
		return api.CodeUnauthenticated
	}
	return api.CodeInternal
}

// isUnknown reports whether err is the refusal of an unknown appliance.
func isUnknown(err error) bool {
	var r *Rejection
	return errors.As(err, &r) && r.Reason == ReasonUnknownAppliance
}

func reject(status int, reason, detail string) *Rejection {
	return &Rejection{Reason: reason, Detail: detail, Status: status}
}

// revoked is the refusal of a revoked appliance: it must lock down.
func revoked() *Rejection {
	return &Rejection{Reason: ReasonRevoked, Status: http.StatusForbidden, Lockdown: true}
}

// ekRevoked refuses to enroll, activate or approve a revoked EK again:
// revocation is permanent, and the appliance is told to lock down.
func ekRevoked() *Rejection {
	return &Rejection{Reason: ReasonEKRevoked, Status: http.StatusForbidden, Lockdown: true}
}

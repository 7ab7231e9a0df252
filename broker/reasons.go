package broker

import (
	"github.com/dataembassy/embassy/protocol/api"
)

// Reasons a request is refused; each appears verbatim in the audit log.
const (
	ReasonUnknownAppliance = api.ReasonUnknownAppliance
	ReasonNotActivated     = "AK was never activated"
	ReasonNotEnrolled      = "enrollment not approved by an operator"
	ReasonRevoked          = "appliance revoked"
	ReasonNonceUnknown     = "nonce unknown or already used"
	ReasonNonceExpired     = "nonce expired"
	ReasonQuote            = "quote signature does not verify with the appliance's AK"
	ReasonPCRDigest        = "PCR values do not match the quoted digest"
	ReasonBinding          = "quote extraData does not bind this nonce and TLS key"
	ReasonClock            = "TPM clock not marked safe"
	ReasonRollback         = "TPM reset or restart count went backwards (state rollback)"
	ReasonReplay           = "event log does not replay to the quoted PCRs"
	ReasonImage            = "measured boot matches no approved image"
	ReasonFloor            = "image version below the appliance's floor"
	ReasonBadRequest       = "malformed request"
	ReasonEKCert           = "EK certificate does not chain to a trusted manufacturer"
	ReasonAK               = "AK is not a restricted TPM signing key"
	ReasonActivation       = "credential activation answer is wrong"
	ReasonManifestSig      = "manifest signature does not verify with the image-signing key"
	ReasonNoDiskApproval   = "no approved disk provisioning pending"
	ReasonDiskExists       = "a share for this disk is already deposited"
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

func reject(status int, reason, detail string) *Rejection {
	return &Rejection{Reason: reason, Detail: detail, Status: status}
}

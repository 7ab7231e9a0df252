package broker

import (
	"crypto/rand"
	"crypto/subtle"
	"crypto/x509"
	"encoding/hex"
	"net/http"
	"strconv"

	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/pcrs"
	"github.com/dataembassy/embassy/tpm/verifier"
)

// Enroll registers an appliance's EK after checking its certificate chain,
// and returns a credential-activation challenge for its AK.
func (b *Broker) Enroll(req *api.EnrollRequest) (_ *api.EnrollChallenge, err error) {
	id := api.ApplianceID(req.EKPublic)
	defer func() { b.record(audit.ApplianceActor(id), "enroll-request", id, err, nil) }()
	ekPub, perr := x509.ParsePKIXPublicKey(req.EKPublic)
	if perr != nil {
		return nil, reject(http.StatusBadRequest, ReasonBadRequest, "EK public key: "+perr.Error())
	}
	if _, err := verifier.VerifyEKCert(req.EKCert, ekPub, b.cfg.ManufacturerCAs, nil); err != nil {
		return nil, reject(http.StatusForbidden, ReasonEKCert, err.Error())
	}
	ak, aerr := verifier.ParseAK(req.AKPublic)
	if aerr != nil {
		return nil, reject(http.StatusForbidden, ReasonAK, aerr.Error())
	}
	secret := make([]byte, 32)
	rand.Read(secret)
	blob, enc, merr := verifier.MakeCredential(ekPub, ak, secret)
	if merr != nil {
		return nil, merr
	}
	defer b.records.lock(id)()
	r, err := b.enrollable(id)
	if err != nil {
		return nil, err
	}
	r.EKPublic, r.EKCert, r.AKPublic, r.Challenge, r.Activated = req.EKPublic, req.EKCert, req.AKPublic, secret, false
	if err := b.save(r); err != nil {
		return nil, err
	}
	return &api.EnrollChallenge{ApplianceID: id, CredentialBlob: blob, EncryptedSecret: enc}, nil
}

// enrollable returns the record an enrollment request for id starts from:
// a new one, or the pending (never approved) one it replaces, which keeps
// what operators set on it (floor, disk approvals, endpoints). An enrolled
// EK is refused, and a revoked EK is refused for good: its record keeps
// the revocation, the floor and the anti-rollback counters. The caller
// holds id's lock (b.records).
func (b *Broker) enrollable(id string) (*record, error) {
	old, err := b.load(id)
	switch {
	case isUnknown(err):
		return &record{ID: id}, nil
	case err != nil:
		return nil, err
	case old.Revoked:
		return nil, ekRevoked()
	case old.Enrolled:
		return nil, reject(http.StatusConflict, ReasonAlreadyEnrolled, id)
	}
	return old, nil
}

// Activate checks the answer to the activation challenge and the
// platform evidence sent with it (a quote by the AK just activated, bound
// to the secret, and the event log it replays), and records the platform
// PCRs' values and events as the appliance's firmware reference. An
// answer without valid evidence is refused (ReasonActivationEvidence) and
// changes nothing, so the appliance may answer again.
func (b *Broker) Activate(req *api.ActivateRequest) (err error) {
	detail := map[string]string{}
	defer func() { b.record(audit.ApplianceActor(req.ApplianceID), "activate", req.ApplianceID, err, detail) }()
	defer b.records.lock(req.ApplianceID)()
	r, err := b.load(req.ApplianceID)
	if err != nil {
		return err
	}
	if r.Revoked {
		return ekRevoked()
	}
	if len(r.Challenge) == 0 || subtle.ConstantTimeCompare(r.Challenge, req.Secret) != 1 {
		return reject(http.StatusForbidden, ReasonActivation, "")
	}
	ak, err := verifier.ParseAK(r.AKPublic)
	if err != nil {
		return err
	}
	fw, err := activationEvidence(ak, req, b.now())
	if err != nil {
		return err
	}
	for _, i := range pcrs.Platform() {
		detail["pcr"+strconv.Itoa(i)] = hex.EncodeToString(fw.PCRs[i])
	}
	detail["firmware_events"] = strconv.Itoa(len(fw.Events))
	r.Activated, r.Challenge, r.Firmware, r.PendingFirmware = true, nil, fw, nil
	return b.save(r)
}

// ApproveEnrollment lets an activated appliance attest (operator action).
// A revoked appliance stays revoked.
func (b *Broker) ApproveEnrollment(by audit.Actor, id string) (err error) {
	defer func() { b.record(by, "enroll", id, err, nil) }()
	defer b.records.lock(id)()
	r, err := b.load(id)
	if err != nil {
		return err
	}
	switch {
	case r.Revoked:
		return ekRevoked() // approval never lifts a revocation
	case !r.Activated:
		return reject(http.StatusConflict, ReasonNotActivated, "")
	}
	r.Enrolled = true
	return b.save(r)
}

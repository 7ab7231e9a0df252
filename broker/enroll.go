package broker

import (
	"crypto/rand"
	"crypto/subtle"
	"crypto/x509"
	"net/http"

	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/verifier"
)

// Enroll registers an appliance's EK after checking its certificate chain,
// and returns a credential-activation challenge for its AK.
func (b *Broker) Enroll(req *api.EnrollRequest) (_ *api.EnrollChallenge, err error) {
	id := api.ApplianceID(req.EKPublic)
	defer func() { b.record("enroll-request", id, err, nil) }()
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
	b.mu.Lock()
	defer b.mu.Unlock()
	if old, lerr := b.load(id); lerr == nil && old.Enrolled && !old.Revoked {
		return nil, reject(http.StatusConflict, ReasonAlreadyEnrolled, id)
	}
	r := &record{ID: id, EKPublic: req.EKPublic, EKCert: req.EKCert, AKPublic: req.AKPublic, Challenge: secret}
	if err := b.save(r); err != nil {
		return nil, err
	}
	return &api.EnrollChallenge{ApplianceID: id, CredentialBlob: blob, EncryptedSecret: enc}, nil
}

// Activate checks the answer to the activation challenge.
func (b *Broker) Activate(req *api.ActivateRequest) (err error) {
	defer func() { b.record("activate", req.ApplianceID, err, nil) }()
	b.mu.Lock()
	defer b.mu.Unlock()
	r, err := b.load(req.ApplianceID)
	if err != nil {
		return err
	}
	if len(r.Challenge) == 0 || subtle.ConstantTimeCompare(r.Challenge, req.Secret) != 1 {
		return reject(http.StatusForbidden, ReasonActivation, "")
	}
	r.Activated, r.Challenge = true, nil
	return b.save(r)
}

// ApproveEnrollment lets an activated appliance attest (operator action).
func (b *Broker) ApproveEnrollment(id string) (err error) {
	defer func() { b.record("enroll", id, err, nil) }()
	b.mu.Lock()
	defer b.mu.Unlock()
	r, err := b.load(id)
	if err != nil {
		return err
	}
	if !r.Activated {
		return reject(http.StatusConflict, ReasonNotActivated, "")
	}
	r.Enrolled, r.Revoked = true, false
	return b.save(r)
}

package broker_test

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// TestReasonCodes pins the machine-readable code of every refusal reason:
// the codes are part of the API.
func TestReasonCodes(t *testing.T) {
	tests := []struct {
		reason string
		code   api.Code
	}{
		{broker.ReasonUnknownAppliance, api.CodeUnknownAppliance},
		{broker.ReasonAlreadyEnrolled, api.CodeAlreadyEnrolled},
		{broker.ReasonNotActivated, api.CodeNotActivated},
		{broker.ReasonNotEnrolled, api.CodeNotApproved},
		{broker.ReasonRevoked, api.CodeRevoked},
		{broker.ReasonEKRevoked, api.CodeEKRevoked},
		{broker.ReasonNonceUnknown, api.CodeNonceUnknown},
		{broker.ReasonNonceExpired, api.CodeNonceExpired},
		{broker.ReasonTooManyNonces, api.CodeTooManyNonces},
		{broker.ReasonQuote, api.CodeQuote},
		{broker.ReasonPCRDigest, api.CodePCRDigest},
		{broker.ReasonBinding, api.CodeBinding},
		{broker.ReasonClock, api.CodeClock},
		{broker.ReasonRollback, api.CodeRollback},
		{broker.ReasonReplay, api.CodeReplay},
		{broker.ReasonImage, api.CodeImage},
		{broker.ReasonFirmware, api.CodeFirmware},
		{broker.ReasonFloor, api.CodeFloor},
		{broker.ReasonFloorDown, api.CodeFloorDown},
		{broker.ReasonBadRequest, api.CodeBadRequest},
		{broker.ReasonEKCert, api.CodeEKCert},
		{broker.ReasonAK, api.CodeAK},
		{broker.ReasonActivation, api.CodeActivation},
		{broker.ReasonActivationEvidence, api.CodeActivationEvidence},
		{broker.ReasonNoPendingFirmware, api.CodeNoPendingFirmware},
		{broker.ReasonNotRevoked, api.CodeNotRevoked},
		{broker.ReasonManifestSig, api.CodeManifestSignature},
		{broker.ReasonManifestConflict, api.CodeManifestConflict},
		{broker.ReasonNoDiskApproval, api.CodeNoDiskApproval},
		{broker.ReasonDiskExists, api.CodeDiskExists},
		{broker.ReasonNotAttested, api.CodeUnauthenticated},
		{broker.ReasonNoOperatorCert, api.CodeUnauthenticated},
		{broker.ReasonNotCustodian, api.CodeUnauthenticated},
		{"disk full", api.CodeInternal},
	}
	for _, tc := range tests {
		if got := (&broker.Rejection{Reason: tc.reason, Detail: "why"}).Code(); got != tc.code {
			t.Errorf("reason %q has code %q, want %q", tc.reason, got, tc.code)
		}
	}
}

// TestErrorAnswersCarryCodes checks the codes on the wire and that the
// appliance's and the operator's clients branch on them.
func TestErrorAnswersCarryCodes(t *testing.T) {
	e := newEnv(t, 2, 2)
	d := tpmtest.NewBootDigests("image-1")
	a := e.boot(1, d, attester.EKRSA)
	defer a.shutdown()

	// Never enrolled: every broker says so, and the appliance knows to
	// enroll without reading the text.
	_, err := a.c.AttestAll(ctxTimeout(t, 30*time.Second), fastRetry, 2)
	if !errors.Is(err, attest.ErrBelowThreshold) || !attest.IsUnknownAppliance(err) {
		t.Fatalf("unenrolled appliance: %v", err)
	}
	var be *attest.BrokerError
	if !errors.As(err, &be) || be.Code != api.CodeUnknownAppliance || be.Status != http.StatusNotFound {
		t.Fatalf("broker error %+v", be)
	}

	// Enrolled but not approved.
	if err := a.c.Enroll(context.Background()); err != nil {
		t.Fatal(err)
	}
	r := a.c.AttestOnce(context.Background(), e.cfg.Brokers[0])
	if !errors.As(r.Err, &be) || be.Code != api.CodeNotApproved || attest.IsUnknownAppliance(r.Err) {
		t.Fatalf("unapproved appliance: %v", r.Err)
	}

	tests := []struct {
		name   string
		method string
		path   string
		body   any
		code   api.Code
	}{
		{"malformed request", http.MethodPost, api.PathAppliances + a.c.ID() + "/disks", api.DiskApprovalRequest{Count: 0}, api.CodeBadRequest},
		{"unknown appliance", http.MethodPost, api.PathAppliances + "0123456789abcdef0123456789abcdef/revoke", struct{}{}, api.CodeUnknownAppliance},
		{"damaged manifest signature", http.MethodPost, api.PathManifests, api.ApproveManifestRequest{Manifest: []byte("{}"), Signature: make([]byte, 64)}, api.CodeManifestSignature},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := e.op(0, tc.method, tc.path, tc.body, nil)
			if got := codeOf(err); got != tc.code {
				t.Fatalf("%v: code %q, want %q", err, got, tc.code)
			}
		})
	}
}

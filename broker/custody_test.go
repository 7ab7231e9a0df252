package broker_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"testing"
	"time"

	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// applianceState returns broker i's record of appliance id as operators
// see it.
func (e *env) applianceState(i int, id string) api.Appliance {
	e.t.Helper()
	var st api.State
	if err := e.op(i, http.MethodGet, api.PathState, nil, &st); err != nil {
		e.t.Fatal(err)
	}
	for _, a := range st.Appliances {
		if a.ID == id {
			return a
		}
	}
	e.t.Fatalf("%s has no record of %s", e.brokers[i].name, id)
	return api.Appliance{}
}

// TestRevocationIsPermanent: whoever holds a revoked appliance's TPM (or a
// coerced operator) tries to bring its EK back. Every attempt is refused
// with ek_revoked and audited, and the record keeps its revocation, floor,
// disks and anti-rollback counters.
func TestRevocationIsPermanent(t *testing.T) {
	e := newEnv(t, 1, 1)
	d := tpmtest.NewBootDigests("image-1")
	a := e.boot(1, d, attester.EKRSA)
	defer a.shutdown()
	provision(t, e, a, d)
	a.reboot(t, d) // the broker sees a reset count above the factory's
	if _, err := a.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 1); err != nil {
		t.Fatal(err)
	}
	id := a.c.ID()
	e.opAll(http.MethodPost, api.PathAppliances+id+"/floor", api.FloorRequest{Version: 1})
	e.opAll(http.MethodPost, api.PathAppliances+id+"/revoke", struct{}{})
	before := e.applianceState(0, id)
	if !before.Revoked || before.Floor != 1 || before.ResetCount == 0 || len(before.Disks) != 1 {
		t.Fatalf("revoked record before the attempts: %+v", before)
	}

	ek, err := a.tpm.EKPublicDER()
	if err != nil {
		t.Fatal(err)
	}
	ak, err := a.tpm.AKPublic()
	if err != nil {
		t.Fatal(err)
	}
	// Another AK on the same TPM (the ECC EK's), as a thief would make.
	other, err := attester.Open(a.sim, attester.EKECC)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	otherAK, err := other.AKPublic()
	if err != nil {
		t.Fatal(err)
	}
	guess := make([]byte, 32)
	rand.Read(guess)

	tests := []struct {
		name    string
		event   string // the audit entry the attempt leaves
		attempt func() error
	}{
		{"enroll again with its own AK", "enroll-request", func() error {
			return postJSON(e, 0, api.PathEnroll, api.EnrollRequest{EKPublic: ek, EKCert: a.tpm.EKCertDER(), AKPublic: ak}, nil)
		}},
		{"enroll with another AK", "enroll-request", func() error {
			return postJSON(e, 0, api.PathEnroll, api.EnrollRequest{EKPublic: ek, EKCert: a.tpm.EKCertDER(), AKPublic: otherAK}, nil)
		}},
		{"activate with a guessed secret", "activate", func() error {
			return postJSON(e, 0, api.PathActivate, api.ActivateRequest{ApplianceID: id, Secret: guess}, nil)
		}},
		{"operator approves the enrollment", "enroll", func() error {
			return e.op(0, http.MethodPost, api.PathEnrollments+"/"+id+"/approve", struct{}{}, nil)
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.attempt()
			if codeOf(err) != api.CodeEKRevoked {
				t.Errorf("got %v (code %q), want a refusal with code %q", err, codeOf(err), api.CodeEKRevoked)
			}
			if after := e.applianceState(0, id); !reflect.DeepEqual(after, before) {
				t.Errorf("the record changed:\nbefore %+v\nafter  %+v", before, after)
			}
			if ent := e.lastAudit(0, tc.event); ent.Result != "fail" || ent.Reason != broker.ReasonEKRevoked || ent.Appliance != id {
				t.Errorf("audit entry %+v", ent)
			}
		})
	}
	// Operators cannot hand a revoked appliance disks to provision or make
	// it anyone's peer.
	for _, tc := range []struct {
		name, event, path string
		body              any
	}{
		{"approve a disk", "approve-disk", api.PathAppliances + id + "/disks", api.DiskApprovalRequest{Count: 1}},
		{"set its endpoints", "set-endpoints", api.PathAppliances + id + "/endpoints", api.EndpointsRequest{Endpoints: []string{"192.0.2.9:8443"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := e.op(0, http.MethodPost, tc.path, tc.body, nil)
			if codeOf(err) != api.CodeRevoked {
				t.Errorf("got %v (code %q), want a refusal with code %q", err, codeOf(err), api.CodeRevoked)
			}
			if after := e.applianceState(0, id); !reflect.DeepEqual(after, before) {
				t.Errorf("the record changed:\nbefore %+v\nafter  %+v", before, after)
			}
			if ent := e.lastAudit(0, tc.event); ent.Result != "fail" || ent.Reason != broker.ReasonRevoked {
				t.Errorf("audit entry %+v", ent)
			}
		})
	}
	// And the appliance is still told to lock down.
	resp, err := rawAttest(t, e, a, 0, nil)
	expectRefused(t, e, 0, resp, err, broker.ReasonRevoked)
}

// TestFloorOnlyGoesUp: a coerced operator tries to lower an appliance's
// floor so that an old, vulnerable image is released keys again. Lower
// floors are refused with floor_lowered and audited, the floor stays, and
// the old image is still refused; the same floor again is accepted and
// changes nothing, a higher one raises it.
func TestFloorOnlyGoesUp(t *testing.T) {
	e := newEnv(t, 1, 1)
	d := tpmtest.NewBootDigests("image-1")
	a := e.boot(1, d, attester.EKRSA)
	defer a.shutdown()
	provision(t, e, a, d) // image 1 attested
	id := a.c.ID()
	floorPath := api.PathAppliances + id + "/floor"
	if err := e.op(0, http.MethodPost, floorPath, api.FloorRequest{Version: 2}, nil); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name      string
		version   uint64
		code      api.Code // "" when accepted
		wantFloor uint64
	}{
		{"back to the old image", 1, api.CodeFloorDown, 2},
		{"to zero", 0, api.CodeFloorDown, 2},
		{"the same floor again", 2, "", 2},
		{"up", 3, "", 3},
		{"back below the raised floor", 2, api.CodeFloorDown, 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := e.op(0, http.MethodPost, floorPath, api.FloorRequest{Version: tc.version}, nil)
			if codeOf(err) != tc.code {
				t.Errorf("set-floor %d: %v (code %q), want code %q", tc.version, err, codeOf(err), tc.code)
			}
			if got := e.applianceState(0, id).Floor; got != tc.wantFloor {
				t.Errorf("floor %d, want %d", got, tc.wantFloor)
			}
			ent := e.lastAudit(0, "set-floor")
			if ent.Appliance != id || ent.Detail["version"] != strconv.FormatUint(tc.version, 10) {
				t.Fatalf("audit entry %+v", ent)
			}
			if tc.code == "" {
				if ent.Result != "ok" {
					t.Fatalf("audit entry %+v", ent)
				}
				return
			}
			if ent.Result != "fail" || ent.Reason != broker.ReasonFloorDown {
				t.Errorf("audit entry %+v", ent)
			}
			// The old image gets nothing.
			resp, err := rawAttest(t, e, a, 0, nil)
			expectRefused(t, e, 0, resp, err, broker.ReasonFloor)
		})
	}
}

// operatorCert issues another operator certificate from the env's
// operator CA.
func (e *env) operatorCert(name string) tls.Certificate {
	e.t.Helper()
	key, _ := pki.NewKey()
	leaf, err := e.operatorCA.Leaf(name, nil, &key.PublicKey, time.Hour)
	if err != nil {
		e.t.Fatal(err)
	}
	return pki.TLSCertificate(leaf, key)
}

func operatorActor(cert tls.Certificate) audit.Actor {
	sum := sha256.Sum256(cert.Certificate[0])
	leaf, _ := x509.ParseCertificate(cert.Certificate[0])
	return audit.Actor{Kind: audit.ActorOperator, Subject: leaf.Subject.String(), Fingerprint: hex.EncodeToString(sum[:])}
}

// TestAuditRecordsActor: two operators and an appliance act; every entry
// names who acted (the operator's certificate subject and fingerprint, or
// the appliance and its id), refusals included, and rewriting who acted
// breaks the chain, in the answer and in the file.
func TestAuditRecordsActor(t *testing.T) {
	e := newEnv(t, 1, 1)
	bobCert := e.operatorCert("operator bob")
	alice, bob := operatorActor(e.opCert), operatorActor(bobCert)
	if alice.Subject != "CN=operator alice" || alice.Fingerprint == bob.Fingerprint {
		t.Fatalf("operators %+v %+v", alice, bob)
	}
	d := tpmtest.NewBootDigests("image-1")
	a := e.boot(1, d, attester.EKRSA)
	defer a.shutdown()
	id := a.c.ID()
	app := audit.ApplianceActor(id)
	asAlice := func(path string, body any) {
		t.Helper()
		if err := e.op(0, http.MethodPost, path, body, nil); err != nil {
			t.Fatal(err)
		}
	}
	asBob := func(path string, body any) error { return e.opAs(bobCert, 0, http.MethodPost, path, body, nil) }

	if err := a.c.Enroll(context.Background()); err != nil {
		t.Fatal(err)
	}
	asAlice(api.PathEnrollments+"/"+id+"/approve", struct{}{})
	m, s := e.signManifest(1, d, e.imageKey)
	if err := asBob(api.PathManifests, api.ApproveManifestRequest{Manifest: m, Signature: s}); err != nil {
		t.Fatal(err)
	}
	asAlice(api.PathAppliances+id+"/disks", api.DiskApprovalRequest{Count: 1})
	if err := asBob(api.PathAppliances+id+"/endpoints", api.EndpointsRequest{Endpoints: []string{"10.0.2.2:9443"}}); err != nil {
		t.Fatal(err)
	}
	asAlice(api.PathAppliances+id+"/floor", api.FloorRequest{Version: 1})
	if err := asBob(api.PathAppliances+id+"/floor", api.FloorRequest{Version: 0}); codeOf(err) != api.CodeFloorDown {
		t.Fatalf("bob lowers the floor: %v", err)
	}
	results, err := a.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 1)
	if err != nil {
		t.Fatal(err)
	}
	secret := make([]byte, 32)
	rand.Read(secret)
	if err := a.c.Deposit(context.Background(), results, "disk-1", secret); err != nil {
		t.Fatal(err)
	}
	if _, err := a.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 1); err != nil { // releases the share
		t.Fatal(err)
	}
	if err := asBob(api.PathAppliances+id+"/revoke", struct{}{}); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		event  string
		result string
		actor  audit.Actor
	}{
		{"enroll-request", "ok", app},
		{"activate", "ok", app},
		{"enroll", "ok", alice},
		{"approve-image", "ok", bob},
		{"approve-disk", "ok", alice},
		{"set-endpoints", "ok", bob},
		{"set-floor", "fail", bob},
		{"attest", "ok", app},
		{"deposit", "ok", app},
		{"release", "ok", app},
		{"revoke", "ok", bob},
	}
	for _, tc := range tests {
		t.Run(tc.event, func(t *testing.T) {
			ent := e.lastAudit(0, tc.event)
			if ent.Result != tc.result || ent.Actor == nil || *ent.Actor != tc.actor {
				t.Fatalf("entry %+v by %v, want %s by %+v", ent, ent.Actor, tc.result, tc.actor)
			}
		})
	}

	// The chain covers who acted: bob's revocation passed off as alice's
	// does not verify, nor does the broker start on such a file.
	var ar audit.Response
	if err := e.op(0, http.MethodGet, api.PathAudit, nil, &ar); err != nil {
		t.Fatal(err)
	}
	if _, err := audit.Verify(ar.Entries, &ar.Head); err != nil {
		t.Fatalf("untouched log: %v", err)
	}
	last := len(ar.Entries) - 1
	if ar.Entries[last].Event != "revoke" {
		t.Fatalf("last entry %+v", ar.Entries[last])
	}
	ar.Entries[last].Actor = &alice
	if _, err := audit.Verify(ar.Entries, &ar.Head); !errors.Is(err, audit.ErrTampered) {
		t.Fatalf("revocation passed off as alice's: %v", err)
	}
	e.stop(0)
	path := filepath.Join(e.brokers[0].dir, "audit.log")
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	edited := bytes.ReplaceAll(raw, []byte(bob.Fingerprint), []byte(alice.Fingerprint))
	edited = bytes.ReplaceAll(edited, []byte(bob.Subject), []byte(alice.Subject))
	os.WriteFile(path, edited, 0o600)
	if _, err := broker.New(e.brokers[0].cfg); !errors.Is(err, audit.ErrTampered) {
		t.Fatalf("broker started on a log whose operator was rewritten: %v", err)
	}
	os.WriteFile(path, raw, 0o600)
	e.start(0)
}

// TestAttestRaisesFloor: an appliance that attests on a newer approved
// image, and reports it runs it committed (not a one-shot trial boot),
// raises its floor to that image's version at the broker, audited; the
// older image gets nothing there afterwards. A trial boot, or a boot that
// reports nothing, raises nothing. Each answer lists the approved images
// (an appliance checks a pushed upgrade against k such lists) and the
// floor.
func TestAttestRaisesFloor(t *testing.T) {
	e := newEnv(t, 2, 2)
	d1, d2 := tpmtest.NewBootDigests("image-1"), tpmtest.NewBootDigests("image-2")
	a := e.boot(1, d1, attester.EKRSA)
	defer a.shutdown()
	provision(t, e, a, d1)
	e.approveImage(2, d2)
	id := a.c.ID()
	steps := []struct {
		name      string
		boot      tpmtest.BootDigests
		running   uint64
		health    *api.UpgradeHealth
		wantErr   api.Code
		wantFloor uint64
	}{
		{"old image, no report", d1, 1, nil, "", 0},
		{"old image, committed", d1, 1, &api.UpgradeHealth{Running: 1}, "", 1},
		{"new image on trial", d2, 2, &api.UpgradeHealth{Running: 2, Trial: true}, "", 1},
		{"old image after the failed trial", d1, 1, &api.UpgradeHealth{Running: 1}, "", 1},
		{"new image committed", d2, 2, &api.UpgradeHealth{Running: 2}, "", 2},
		{"old image again", d1, 1, &api.UpgradeHealth{Running: 1}, api.CodeFloor, 2},
	}
	for _, st := range steps {
		a.reboot(t, st.boot)
		for i := range e.brokers {
			resp, err := rawAttest(t, e, a, i, func(r *api.AttestRequest) {
				if st.health != nil {
					r.Health = &api.Health{Upgrade: st.health}
				}
			})
			if codeOf(err) != st.wantErr {
				t.Fatalf("%s at broker %d: %v, want code %q", st.name, i, err, st.wantErr)
			}
			if got := e.applianceState(i, id).Floor; got != st.wantFloor {
				t.Fatalf("%s: floor %d at broker %d, want %d", st.name, got, i, st.wantFloor)
			}
			if err != nil {
				continue
			}
			if resp.Floor != st.wantFloor || len(resp.Approved) != 2 || resp.Approved[0].Version != 2 || resp.Approved[1].Version != 1 {
				t.Fatalf("%s: answer floor %d, approved %+v", st.name, resp.Floor, resp.Approved)
			}
		}
	}
	if ent := e.lastAudit(0, "raise-floor"); ent.Result != "ok" || ent.Detail["from"] != "1" || ent.Detail["to"] != "2" {
		t.Fatalf("floor raise audited as %+v", ent)
	}
}

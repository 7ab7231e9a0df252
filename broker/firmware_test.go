package broker_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	tpmclient "github.com/google/go-tpm-tools/client"
	pb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm/legacy/tpm2"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/operator/opclient"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/pcrs"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// bootFirmware powers on a machine with TPM seed whose platform measures
// fw before the image d boots.
func (e *env) bootFirmware(seed int64, fw tpmtest.Firmware, d tpmtest.BootDigests) *appliance {
	e.t.Helper()
	return e.bootLog(seed, func(rw io.ReadWriter) []byte { return tpmtest.FirmwareBoot(e.t, rw, fw, d) })
}

// bootLog powers on a machine with TPM seed whose boot measure plays.
func (e *env) bootLog(seed int64, measure func(io.ReadWriter) []byte) *appliance {
	e.t.Helper()
	a := &appliance{sim: tpmtest.NewSimulator(e.t, e.manu, seed), cfg: e.cfg, brokerCAs: e.brokerCAs()}
	a.log = measure(a.sim)
	var err error
	if a.tpm, err = attester.Open(a.sim, attester.EKRSA); err != nil {
		e.t.Fatal(err)
	}
	a.tlsKey, _ = pki.NewKey()
	if a.c, err = attest.New(a.cfg, a.brokerCAs, a.tpm, a.tlsKey, func() ([]byte, error) { return a.log, nil }, quiet()); err != nil {
		e.t.Fatal(err)
	}
	return a
}

// rebootFirmware power-cycles the machine; its platform measures fw, then
// image d boots.
func (a *appliance) rebootFirmware(t testing.TB, fw tpmtest.Firmware, d tpmtest.BootDigests) {
	t.Helper()
	a.tpm.Close()
	if err := a.sim.Reset(); err != nil {
		t.Fatal(err)
	}
	a.log = tpmtest.FirmwareBoot(t, a.sim, fw, d)
	var err error
	if a.tpm, err = attester.Open(a.sim, attester.EKRSA); err != nil {
		t.Fatal(err)
	}
	if a.c, err = attest.New(a.cfg, a.brokerCAs, a.tpm, a.tlsKey, func() ([]byte, error) { return a.log, nil }, quiet()); err != nil {
		t.Fatal(err)
	}
}

// countAudit counts broker i's audit entries of an event with a result.
func (e *env) countAudit(i int, event, result string) int {
	e.t.Helper()
	var ar audit.Response
	if err := e.op(i, http.MethodGet, api.PathAudit, nil, &ar); err != nil {
		e.t.Fatal(err)
	}
	n := 0
	for _, ent := range ar.Entries {
		if ent.Event == event && ent.Result == result {
			n++
		}
	}
	return n
}

func digestHex(s string) string {
	d := sha256.Sum256([]byte(s))
	return hex.EncodeToString(d[:])
}

// TestFirmwareReference walks an appliance through a firmware change: the
// brokers record the platform at enrollment, release to an identical
// platform, refuse a changed firmware volume with code firmware (audited
// with the PCR and event, nothing released, kept as pending), and release
// again after an operator's approve-firmware; approve-firmware with
// nothing pending, and on a revoked appliance, is refused.
func TestFirmwareReference(t *testing.T) {
	e := newEnv(t, 2, 2)
	oc := e.operatorClient()
	ctx := context.Background()
	d := tpmtest.NewBootDigests("image-1")
	fw := tpmtest.NewFirmware("vendor 1.0")
	a := e.bootFirmware(1, fw, d)
	defer a.shutdown()
	e.enroll(a)
	id := a.c.ID()
	e.approveImage(1, d)

	// Enrollment recorded the platform: the audit entry names its values.
	for i := range e.brokers {
		if st := e.applianceState(i, id); !st.FirmwareReference || st.PendingFirmware != nil {
			t.Fatalf("%s after enrollment: reference %v, pending %+v", e.brokers[i].name, st.FirmwareReference, st.PendingFirmware)
		}
		act := e.lastAudit(i, "activate")
		if act.Result != "ok" || len(act.Detail["pcr0"]) != 64 || act.Detail["pcr4"] != "" || act.Detail["firmware_events"] == "0" {
			t.Fatalf("activate entry %+v", act)
		}
	}

	// An identical platform attests; a disk's shares are deposited and
	// released (and unsealed: the seal's PCR values are the platform's).
	e.opAll(http.MethodPost, api.PathAppliances+id+"/disks", api.DiskApprovalRequest{Count: 1})
	results, err := a.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 2)
	if err != nil {
		t.Fatal(err)
	}
	secret := make([]byte, 32)
	rand.Read(secret)
	if err := a.c.Deposit(ctx, results, "disk-1", secret); err != nil {
		t.Fatal(err)
	}
	a.rebootFirmware(t, fw, d)
	res, err := a.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 2)
	if err != nil {
		t.Fatalf("identical platform: %v", err)
	}
	if len(res) != 2 || len(res[0].Shares) != 1 {
		t.Fatalf("identical platform released %+v", res)
	}
	attest.Round(res).WipeShares()
	released := e.countAudit(0, "release", "ok")

	// A different firmware volume: refused everywhere with code firmware.
	fw2 := fw
	fw2.Blobs = slices.Clone(fw.Blobs)
	fw2.Blobs[1] = "vendor 1.1 DXE volume"
	a.rebootFirmware(t, fw2, d)
	for i, b := range e.cfg.Brokers {
		r := a.c.AttestOnce(ctx, b)
		var be *attest.BrokerError
		if !errors.As(r.Err, &be) || be.Code != api.CodeFirmware || be.Lockdown {
			t.Fatalf("%s: changed firmware answered %v", b.Name, r.Err)
		}
		ent := e.lastAudit(i, "attest")
		want := "PCR0: event 2 EV_EFI_PLATFORM_FIRMWARE_BLOB2 digest " + digestHex(fw2.Blobs[1])[:12] + "… (was " + digestHex(fw.Blobs[1])[:12] + "…)"
		if ent.Result != "fail" || ent.Reason != broker.ReasonFirmware || !strings.Contains(ent.Detail["why"], want) ||
			ent.Detail["firmware_pcrs"] != "0" || len(ent.Detail["why"]) > 1100 {
			t.Fatalf("%s audited %+v, want why containing %q", b.Name, ent, want)
		}
		st := e.applianceState(i, id)
		if p := st.PendingFirmware; !st.FirmwareReference || p == nil || !slices.Equal(p.PCRs, []int{0}) || len(p.Differences) != 1 ||
			!strings.Contains(p.Differences[0], want) {
			t.Fatalf("%s pending firmware %+v", b.Name, st.PendingFirmware)
		}
	}
	if n := e.countAudit(0, "release", "ok"); n != released {
		t.Fatalf("changed firmware: %d releases, want %d", n, released)
	}
	// What the operator sees before approving.
	var out bytes.Buffer
	opclient.PrintFirmware(&out, id, oc.Firmware(ctx, id))
	if !strings.Contains(out.String(), "EV_EFI_PLATFORM_FIRMWARE_BLOB2") || !strings.Contains(out.String(), "approve-firmware --digest ") {
		t.Fatalf("firmware view:\n%s", out.String())
	}
	out.Reset()
	opclient.PrintStatus(&out, oc.Status(ctx))
	if !strings.Contains(out.String(), "firmware change pending (PCRs 0") {
		t.Fatalf("status:\n%s", out.String())
	}

	// A third firmware while one is pending: refused, and the pending one
	// (what the operator reviewed) stays.
	before := e.applianceState(0, id).PendingFirmware
	fw3 := fw2
	fw3.BootOrder = "vendor BootOrder 0002"
	a.rebootFirmware(t, fw3, d)
	if r := a.c.AttestOnce(ctx, e.cfg.Brokers[0]); !isCode(r.Err, api.CodeFirmware) {
		t.Fatalf("third firmware: %v", r.Err)
	}
	if after := e.applianceState(0, id).PendingFirmware; !slices.Equal(after.PCRs, before.PCRs) || !slices.Equal(after.Differences, before.Differences) {
		t.Fatalf("pending firmware replaced: %+v, was %+v", after, before)
	}

	// approve-firmware adopts only the measurement the operator reviewed:
	// another digest (someone in the cage booted other firmware after the
	// review, or a typo) is refused and changes nothing; reject-firmware
	// with another digest changes nothing either.
	if before.Digest == "" {
		t.Fatal("the pending firmware has no digest")
	}
	other := strings.Repeat("0", 64)
	for _, call := range []func(context.Context, string, string) ([]opclient.Outcome, error){oc.ApproveFirmware, oc.RejectFirmware} {
		if outs, err := call(ctx, id, other); err == nil || outs[0].Code != api.CodeFirmwareDigest {
			t.Fatalf("firmware action with another digest: %v %+v", err, outs)
		}
	}
	if after := e.applianceState(0, id); after.PendingFirmware == nil || after.PendingFirmware.Digest != before.Digest {
		t.Fatalf("a refused action changed the pending firmware: %+v", after.PendingFirmware)
	}
	// approve-firmware with the reviewed digest adopts the pending
	// measurement, audited with the PCR's old and new value.
	outs, err := oc.ApproveFirmware(ctx, id, before.Digest)
	if err != nil || len(outs) != 2 || !outs[0].OK || !outs[1].OK {
		t.Fatalf("approve-firmware: %v %+v", err, outs)
	}
	for i := range e.brokers {
		ent := e.lastAudit(i, "approve-firmware")
		if ent.Result != "ok" || ent.Actor == nil || ent.Actor.Kind != audit.ActorOperator || ent.Detail["changed_pcrs"] != "0" ||
			!strings.Contains(ent.Detail["pcr0"], " -> ") || ent.Detail["pcr7"] != "" || !strings.Contains(ent.Detail["events"], "PCR0: event 2") {
			t.Fatalf("%s approve-firmware entry %+v", e.brokers[i].name, ent)
		}
		if st := e.applianceState(i, id); !st.FirmwareReference || st.PendingFirmware != nil {
			t.Fatalf("%s after approval: %+v", e.brokers[i].name, st)
		}
	}
	// The approved firmware attests and gets its share; the old one no
	// longer does.
	a.rebootFirmware(t, fw2, d)
	res, err = a.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 2)
	if err != nil {
		t.Fatalf("approved firmware: %v", err)
	}
	if len(res[0].Shares) != 1 {
		t.Fatalf("approved firmware released %+v", res[0])
	}
	attest.Round(res).WipeShares()
	if n := e.countAudit(0, "release", "ok"); n != released+1 {
		t.Fatalf("approved firmware: %d releases, want %d", n, released+1)
	}
	a.rebootFirmware(t, fw, d)
	if r := a.c.AttestOnce(ctx, e.cfg.Brokers[0]); !isCode(r.Err, api.CodeFirmware) {
		t.Fatalf("the old firmware after approval: %v", r.Err)
	}

	// Nothing pending at broker b: refused there with a code, audited.
	if err := e.op(1, http.MethodPost, api.PathAppliances+id+"/firmware", api.FirmwareApproval{Digest: before.Digest}, nil); codeOf(err) != api.CodeNoPendingFirmware {
		t.Fatalf("approve-firmware with nothing pending: %v", err)
	}
	if ent := e.lastAudit(1, "approve-firmware"); ent.Result != "fail" || ent.Reason != broker.ReasonNoPendingFirmware {
		t.Fatalf("refused approval audited as %+v", ent)
	}
	// A revoked appliance's pending firmware is never approved.
	e.opAll(http.MethodPost, api.PathAppliances+id+"/revoke", struct{}{})
	outs, err = oc.ApproveFirmware(ctx, id, before.Digest)
	if err == nil || outs[0].Code != api.CodeRevoked {
		t.Fatalf("approve-firmware on a revoked appliance: %v %+v", err, outs)
	}
	if ent := e.lastAudit(0, "approve-firmware"); ent.Result != "fail" || ent.Reason != broker.ReasonRevoked {
		t.Fatalf("refused approval audited as %+v", ent)
	}
}

func isCode(err error, code api.Code) bool {
	var be *attest.BrokerError
	return errors.As(err, &be) && be.Code == code
}

// quoteOf carries a quote's PCR values as a request does.
func quoteOf(q *pb.Quote) map[int][]byte {
	out := map[int][]byte{}
	for i, v := range q.GetPcrs().GetPcrs() {
		out[int(i)] = v
	}
	return out
}

// otherSelection is a quote by the appliance's AK over PCRs 0-9 only (the
// old selection) with the values of the whole policy.
func otherSelection(t *testing.T, a *appliance, extraData []byte) (*pb.Quote, map[int][]byte) {
	t.Helper()
	ak, err := tpmclient.LoadCachedKey(a.sim, attester.AKHandle, tpmclient.NullSession{})
	if err != nil {
		t.Fatal(err)
	}
	defer ak.Close()
	q, err := ak.Quote(tpm2.PCRSelection{Hash: tpm2.AlgSHA256, PCRs: []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}}, extraData)
	if err != nil {
		t.Fatal(err)
	}
	values, err := attester.QuotePCRsRead(a.sim)
	if err != nil {
		t.Fatal(err)
	}
	return q, values
}

// TestActivationNeedsEvidence refuses activation answers without valid
// platform evidence, changing nothing, and then accepts the valid one.
func TestActivationNeedsEvidence(t *testing.T) {
	e := newEnv(t, 1, 1)
	d := tpmtest.NewBootDigests("image-1")
	a := e.bootFirmware(1, tpmtest.NewFirmware("vendor 1.0"), d)
	defer a.shutdown()
	ek, _ := a.tpm.EKPublicDER()
	akPub, _ := a.tpm.AKPublic()
	var ch api.EnrollChallenge
	if err := postJSON(e, 0, api.PathEnroll, api.EnrollRequest{EKPublic: ek, EKCert: a.tpm.EKCertDER(), AKPublic: akPub}, &ch); err != nil {
		t.Fatal(err)
	}
	secret, err := a.tpm.Activate(ch.CredentialBlob, ch.EncryptedSecret)
	if err != nil {
		t.Fatal(err)
	}
	q, err := a.tpm.Quote(api.ActivationExtraData(secret))
	if err != nil {
		t.Fatal(err)
	}
	valid := func() api.ActivateRequest {
		return api.ActivateRequest{ApplianceID: ch.ApplianceID, Secret: secret, Quote: q.GetQuote(), Signature: q.GetRawSig(),
			PCRs: quoteOf(q), EventLog: a.log}
	}
	unbound, err := a.tpm.Quote(api.ActivationExtraData(make([]byte, 32)))
	if err != nil {
		t.Fatal(err)
	}
	otherQ, otherValues := otherSelection(t, a, api.ActivationExtraData(secret))
	otherLog := tpmtest.NewEventLog()
	otherLog.Add(0, tpmtest.EvSCRTMVersion, make([]byte, 32), []byte("another platform"))

	tests := []struct {
		name   string
		change func(*api.ActivateRequest)
	}{
		{"no evidence", func(r *api.ActivateRequest) { r.Quote, r.Signature, r.PCRs, r.EventLog = nil, nil, nil, nil }},
		{"no event log", func(r *api.ActivateRequest) { r.EventLog = nil }},
		{"quote bound to another secret", func(r *api.ActivateRequest) {
			r.Quote, r.Signature, r.PCRs = unbound.GetQuote(), unbound.GetRawSig(), quoteOf(unbound)
		}},
		{"bad signature", func(r *api.ActivateRequest) {
			r.Signature = bytes.Clone(r.Signature)
			r.Signature[len(r.Signature)-1] ^= 1
		}},
		{"changed PCR value", func(r *api.ActivateRequest) { r.PCRs[0] = make([]byte, 32) }},
		{"missing PCR", func(r *api.ActivateRequest) { delete(r.PCRs, 12) }},
		{"extra PCR", func(r *api.ActivateRequest) { r.PCRs[10] = make([]byte, 32) }},
		{"quote over another selection", func(r *api.ActivateRequest) {
			r.Quote, r.Signature, r.PCRs = otherQ.GetQuote(), otherQ.GetRawSig(), otherValues
		}},
		{"event log of another platform", func(r *api.ActivateRequest) { r.EventLog = otherLog.Bytes() }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req := valid()
			req.PCRs = quoteOf(q)
			tc.change(&req)
			err := postJSON(e, 0, api.PathActivate, req, nil)
			if codeOf(err) != api.CodeActivationEvidence {
				t.Fatalf("%v: code %q, want %q", err, codeOf(err), api.CodeActivationEvidence)
			}
			if ent := e.lastAudit(0, "activate"); ent.Result != "fail" || ent.Reason != broker.ReasonActivationEvidence {
				t.Fatalf("audited %+v", ent)
			}
			if st := e.applianceState(0, ch.ApplianceID); st.Activated || st.FirmwareReference {
				t.Fatalf("refused activation changed the record: %+v", st)
			}
		})
	}
	// The challenge is still open: the valid answer activates.
	if err := postJSON(e, 0, api.PathActivate, valid(), nil); err != nil {
		t.Fatal(err)
	}
	if st := e.applianceState(0, ch.ApplianceID); !st.Activated || !st.FirmwareReference {
		t.Fatalf("activated record %+v", st)
	}
}

// TestAttestationPCRSelection refuses a quote over another PCR selection
// and requests whose PCR map has an index more or less than the policy.
func TestAttestationPCRSelection(t *testing.T) {
	e := newEnv(t, 1, 1)
	d := tpmtest.NewBootDigests("image-1")
	a := e.bootFirmware(1, tpmtest.NewFirmware("vendor 1.0"), d)
	defer a.shutdown()
	e.enroll(a)
	e.approveImage(1, d)
	id := a.c.ID()
	tlsPub, err := x509.MarshalPKIXPublicKey(a.tlsKey.Public())
	if err != nil {
		t.Fatal(err)
	}
	tlsHash := sha256.Sum256(tlsPub)
	request := func(t *testing.T, quote func(extra []byte) (*pb.Quote, map[int][]byte)) api.AttestRequest {
		t.Helper()
		var n api.NonceResponse
		if err := postJSON(e, 0, api.PathNonce, api.NonceRequest{ApplianceID: id}, &n); err != nil {
			t.Fatal(err)
		}
		q, values := quote(api.ExtraData(n.Nonce, tlsHash[:]))
		return api.AttestRequest{ApplianceID: id, Nonce: n.Nonce, Quote: q.GetQuote(), Signature: q.GetRawSig(), PCRs: values,
			EventLog: a.log, TLSPublic: tlsPub}
	}
	policy := func(extra []byte) (*pb.Quote, map[int][]byte) {
		q, err := a.tpm.Quote(extra)
		if err != nil {
			t.Fatal(err)
		}
		return q, quoteOf(q)
	}
	tests := []struct {
		name   string
		quote  func([]byte) (*pb.Quote, map[int][]byte)
		change func(map[int][]byte)
		code   api.Code
	}{
		{"policy selection", policy, func(map[int][]byte) {}, ""},
		{"quote over PCRs 0-9", func(extra []byte) (*pb.Quote, map[int][]byte) { return otherSelection(t, a, extra) }, func(map[int][]byte) {}, api.CodeQuote},
		{"extra PCR index", policy, func(m map[int][]byte) { m[10] = make([]byte, 32) }, api.CodeBadRequest},
		{"missing PCR index", policy, func(m map[int][]byte) { delete(m, 11) }, api.CodeBadRequest},
		{"PCR 10 for PCR 12", policy, func(m map[int][]byte) { m[10] = m[12]; delete(m, 12) }, api.CodeBadRequest},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req := request(t, tc.quote)
			tc.change(req.PCRs)
			var resp api.AttestResponse
			err := postJSON(e, 0, api.PathAttest, req, &resp)
			if codeOf(err) != tc.code || (tc.code == "" && err != nil) {
				t.Fatalf("%v: code %q, want %q", err, codeOf(err), tc.code)
			}
		})
	}
	if !slices.Equal(pcrs.Indexes(), []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13}) {
		t.Fatal("the test assumes the policy selection 0-9, 11-13")
	}
}

// TestOverridesRefused: a boot whose stub measured command-line or
// credential overrides into PCR12, or system extensions into PCR13,
// matches no approved image.
func TestOverridesRefused(t *testing.T) {
	for _, pcr := range []int{12, 13} {
		t.Run(fmt.Sprintf("PCR%d", pcr), func(t *testing.T) {
			e := newEnv(t, 1, 1)
			d := tpmtest.NewBootDigests("image-1")
			a := e.bootLog(1, func(rw io.ReadWriter) []byte {
				l := tpmtest.NewEventLog()
				l.MeasureFirmware(t, rw, tpmtest.NewFirmware("vendor 1.0"))
				l.MeasureBoot(t, rw, d)
				extra := sha256.Sum256([]byte("an injected credential or extension"))
				l.Measure(t, rw, pcr, tpmtest.EvEventTag, extra[:], []byte("extra\x00"))
				return l.Bytes()
			})
			defer a.shutdown()
			e.enroll(a)
			e.approveImage(1, d)
			r := a.c.AttestOnce(context.Background(), e.cfg.Brokers[0])
			if !isCode(r.Err, api.CodeImage) {
				t.Fatalf("boot with PCR%d events: %v", pcr, r.Err)
			}
			if ent := e.lastAudit(0, "attest"); ent.Reason != broker.ReasonImage || !strings.Contains(ent.Detail["why"], fmt.Sprintf("PCR%d must hold nothing", pcr)) {
				t.Fatalf("audited %+v", ent)
			}
		})
	}
}

package broker_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	pb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm/legacy/tpm2"
	"google.golang.org/protobuf/proto"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// provision enrolls, approves image v1 and one disk, and deposits a disk
// secret; it returns the secret.
func provision(t testing.TB, e *env, a *appliance, d tpmtest.BootDigests) []byte {
	t.Helper()
	e.enroll(a)
	e.approveImage(1, d)
	e.opAll(http.MethodPost, api.PathAppliances+a.c.ID()+"/disks", api.DiskApprovalRequest{Count: 1})
	results, err := a.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, len(e.brokers))
	if err != nil {
		t.Fatal(err)
	}
	if results[0].DiskApprovals != 1 {
		t.Fatalf("disk approvals %d", results[0].DiskApprovals)
	}
	secret := make([]byte, 32)
	rand.Read(secret)
	if err := a.c.Deposit(context.Background(), results, "disk-1", secret); err != nil {
		t.Fatal(err)
	}
	return secret
}

func TestFullFlowThreeBrokersK2(t *testing.T) {
	e := newEnv(t, 3, 2)
	d := tpmtest.NewBootDigests("image-1")
	a := e.boot(1, d, attester.EKRSA)
	defer a.shutdown()
	secret := provision(t, e, a, d)

	// Boot again: the brokers release the shares and k of them recombine.
	a.reboot(t, d)
	results, err := a.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 2)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := attest.Round(results).Keys(2)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(keys["disk-1"], secret) {
		t.Fatal("recombined key differs from the deposited one")
	}
	for _, r := range results {
		if r.ImageVersion != 1 || r.Certificate == nil {
			t.Fatalf("result %+v", r)
		}
		// The certificate is for the ephemeral key bound in the quote.
		if !r.Certificate.Leaf.PublicKey.(*ecdsa.PublicKey).Equal(a.tlsKey.Public()) {
			t.Fatal("certificate is for another key")
		}
		if !strings.HasPrefix(r.Certificate.Leaf.DNSNames[0], a.c.ID()) {
			t.Fatalf("certificate names %v", r.Certificate.Leaf.DNSNames)
		}
	}
	// The release is audited.
	if ent := e.lastAudit(0, "release"); ent.Result != "ok" || ent.Detail["disks"] != "disk-1" {
		t.Fatalf("release audit %+v", ent)
	}

	// One broker down: still k answers. (The boot's unlock, which goes on
	// at k; a whole round would retry the broker that is down until its
	// deadline.)
	e.stop(2)
	results, _, err = a.c.AttestFirst(ctxTimeout(t, time.Minute), fastRetry, 2)
	if err != nil {
		t.Fatalf("one broker down: %v", err)
	}
	keys, _ = attest.Round(results).Keys(2)
	if !bytes.Equal(keys["disk-1"], secret) {
		t.Fatal("one broker down: wrong key")
	}

	// Two down: no key and a clear error.
	e.stop(1)
	results, err = a.c.AttestAll(ctxTimeout(t, 3*time.Second), fastRetry, 2)
	if !errors.Is(err, attest.ErrBelowThreshold) || !strings.Contains(err.Error(), "1 of 3 brokers answered, 2 needed") {
		t.Fatalf("two brokers down: %v", err)
	}
	if keys, _ := attest.Round(results).Keys(2); len(keys) != 0 {
		t.Fatal("a key was recombined from one share")
	}
}

// rawAttest runs one attestation against broker i by hand so a test can
// tamper with the request. It returns the response or the broker's error.
func rawAttest(t *testing.T, e *env, a *appliance, i int, mutate func(*api.AttestRequest)) (*api.AttestResponse, error) {
	t.Helper()
	var n api.NonceResponse
	if err := postJSON(e, i, api.PathNonce, api.NonceRequest{ApplianceID: a.c.ID()}, &n); err != nil {
		t.Fatal(err)
	}
	req := quoteRequest(t, a, a.c.ID(), n.Nonce)
	if mutate != nil {
		mutate(&req)
	}
	return postAttest(e, i, req)
}

// quoteRequest quotes with a's TPM over nonce and a's TLS key and builds
// the attestation request for appliance id.
func quoteRequest(t testing.TB, a *appliance, id string, nonce []byte) api.AttestRequest {
	t.Helper()
	h := sha256.Sum256(a.c.TLSPublicKey())
	q, err := a.tpm.Quote(api.ExtraData(nonce, h[:]))
	if err != nil {
		t.Fatal(err)
	}
	req := api.AttestRequest{ApplianceID: id, Nonce: nonce, Quote: q.Quote, Signature: q.RawSig,
		PCRs: map[int][]byte{}, EventLog: a.log, TLSPublic: a.c.TLSPublicKey()}
	for k, v := range q.GetPcrs().GetPcrs() {
		req.PCRs[int(k)] = v
	}
	return req
}

// expectRefused checks that an attestation was refused for reason, that
// nothing was released and that broker i audited the reason.
func expectRefused(t *testing.T, e *env, i int, resp *api.AttestResponse, err error, reason string) {
	t.Helper()
	if err == nil || resp != nil {
		t.Fatalf("attestation accepted (want %q)", reason)
	}
	if !strings.HasPrefix(err.Error(), reason) {
		t.Fatalf("refused with %q, want %q", err, reason)
	}
	if want := (&broker.Rejection{Reason: reason}).Code(); codeOf(err) != want || want == api.CodeInternal {
		t.Fatalf("refused with code %q, want %q", codeOf(err), want)
	}
	ent := e.lastAudit(i, "attest")
	if ent.Result != "fail" || ent.Reason != reason {
		t.Fatalf("audit entry %+v, want reason %q", ent, reason)
	}
}

func TestNegativeMatrix(t *testing.T) {
	e := newEnv(t, 3, 2)
	d := tpmtest.NewBootDigests("image-1")
	a := e.boot(1, d, attester.EKRSA)
	provision(t, e, a, d)
	a.reboot(t, d) // resetCount now above the manufactured TPM's

	// A good attestation works before each tampering; broker-b sees the
	// raised reset count too (for the rollback case below).
	resp, err := rawAttest(t, e, a, 0, nil)
	if err != nil || len(resp.Shares) != 1 {
		t.Fatalf("baseline attestation: %v", err)
	}
	if _, err := rawAttest(t, e, a, 1, nil); err != nil {
		t.Fatal(err)
	}

	t.Run("replayed nonce", func(t *testing.T) {
		var captured api.AttestRequest
		if _, err := rawAttest(t, e, a, 0, func(r *api.AttestRequest) { captured = *r }); err != nil {
			t.Fatal(err)
		}
		resp, err := postAttest(e, 0, captured)
		expectRefused(t, e, 0, resp, err, broker.ReasonNonceUnknown)
	})
	t.Run("expired nonce", func(t *testing.T) {
		resp, err := rawAttest(t, e, a, 0, func(*api.AttestRequest) { e.clock.advance(2 * time.Minute) })
		expectRefused(t, e, 0, resp, err, broker.ReasonNonceExpired)
	})
	t.Run("PCR9 extended after the quote", func(t *testing.T) {
		resp, err := rawAttest(t, e, a, 0, func(r *api.AttestRequest) {
			tpm2.PCRExtend(a.sim, 9, tpm2.AlgSHA256, make([]byte, 32), "")
			now, _ := attester.QuotePCRsRead(a.sim)
			r.PCRs = now
		})
		expectRefused(t, e, 0, resp, err, broker.ReasonPCRDigest)
		a.reboot(t, d)
	})
	t.Run("event log does not replay", func(t *testing.T) {
		resp, err := rawAttest(t, e, a, 0, func(r *api.AttestRequest) {
			r.EventLog = append([]byte(nil), r.EventLog...)
			r.EventLog[len(r.EventLog)-20] ^= 1 // inside the initrd event's digest
		})
		expectRefused(t, e, 0, resp, err, broker.ReasonReplay)
	})
	t.Run("TLS key differs from the quote", func(t *testing.T) {
		other, _ := rsaOrECKey()
		resp, err := rawAttest(t, e, a, 0, func(r *api.AttestRequest) { r.TLSPublic = other })
		expectRefused(t, e, 0, resp, err, broker.ReasonBinding)
	})
	t.Run("image below floor", func(t *testing.T) {
		// On broker-c, which the later cases do not need: floors only go
		// up, so this one stays at 2.
		if err := e.op(2, http.MethodPost, api.PathAppliances+a.c.ID()+"/floor", api.FloorRequest{Version: 2}, nil); err != nil {
			t.Fatal(err)
		}
		resp, err := rawAttest(t, e, a, 2, nil)
		expectRefused(t, e, 2, resp, err, broker.ReasonFloor)
	})
	t.Run("manifest not approved", func(t *testing.T) {
		a.reboot(t, tpmtest.NewBootDigests("unapproved image"))
		resp, err := rawAttest(t, e, a, 0, nil)
		expectRefused(t, e, 0, resp, err, broker.ReasonImage)
	})
	t.Run("manifest signed with the wrong key", func(t *testing.T) {
		d3 := tpmtest.NewBootDigests("image signed by someone else")
		_, wrongKey, _ := ed25519GenerateKey()
		m, s := e.signManifest(3, d3, wrongKey)
		err := e.op(0, http.MethodPost, api.PathManifests, api.ApproveManifestRequest{Manifest: m, Signature: s}, nil)
		if err == nil || !strings.HasPrefix(err.Error(), broker.ReasonManifestSig) {
			t.Fatalf("approve with wrong key: %v", err)
		}
		if ent := e.lastAudit(0, "approve-image"); ent.Result != "fail" || ent.Reason != broker.ReasonManifestSig {
			t.Fatalf("audit %+v", ent)
		}
		a.reboot(t, d3)
		resp, err := rawAttest(t, e, a, 0, nil)
		expectRefused(t, e, 0, resp, err, broker.ReasonImage)
		a.reboot(t, d)
	})
	t.Run("AK never activated", func(t *testing.T) {
		// The same machine's ECC EK: another identity, enrolled but never
		// activated.
		b, err := attester.Open(a.sim, attester.EKECC)
		if err != nil {
			t.Fatal(err)
		}
		defer b.Close()
		other := &appliance{sim: a.sim, tpm: b, log: a.log, tlsKey: a.tlsKey, cfg: a.cfg, brokerCAs: a.brokerCAs}
		other.c, _ = attest.New(e.cfg, e.brokerCAs(), b, a.tlsKey, func() ([]byte, error) { return a.log, nil }, quiet())
		ek, _ := b.EKPublicDER()
		akPub, _ := b.AKPublic()
		var ch api.EnrollChallenge
		if err := postJSON(e, 0, api.PathEnroll, api.EnrollRequest{EKPublic: ek, EKCert: b.EKCertDER(), AKPublic: akPub}, &ch); err != nil {
			t.Fatal(err)
		}
		resp, err := rawAttest(t, e, other, 0, nil)
		expectRefused(t, e, 0, resp, err, broker.ReasonNotActivated)
		// And an operator cannot approve it either.
		if err := e.op(0, http.MethodPost, api.PathEnrollments+"/"+ch.ApplianceID+"/approve", struct{}{}, nil); err == nil {
			t.Fatal("approved an enrollment whose AK was never activated")
		}
	})

	// Captured release: a share blob released to TPM A, imported elsewhere.
	resp, err = rawAttest(t, e, a, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	var blob pb.ImportBlob
	if err := proto.Unmarshal(resp.Shares[0].Blob, &blob); err != nil {
		t.Fatal(err)
	}
	if _, err := a.tpm.Import(&blob); err != nil {
		t.Fatalf("the released share does not import on its own TPM: %v", err)
	}
	t.Run("captured release after a PCR change", func(t *testing.T) {
		tpm2.PCRExtend(a.sim, 9, tpm2.AlgSHA256, make([]byte, 32), "")
		if _, err := a.tpm.Import(&blob); err == nil {
			t.Fatal("captured release imported after PCR 9 changed")
		}
	})

	// The last cases need other TPMs: the simulator runs one at a time.
	id := a.c.ID()
	a.shutdown()
	t.Run("quote from another TPM", func(t *testing.T) {
		b := e.boot(2, d, attester.EKRSA)
		defer b.shutdown()
		// A release captured in transit does not import on another TPM.
		if _, err := b.tpm.Import(&blob); err == nil {
			t.Fatal("a share released to TPM A imported on TPM B")
		}
		resp, err := rawAttest(t, e, b, 1, func(r *api.AttestRequest) { r.ApplianceID = id })
		if err == nil || resp != nil {
			t.Fatal("accepted")
		}
		// The nonce was issued for b's id; asking with a's id makes it
		// unknown, so ask for a nonce for a's id and quote with b's AK.
		resp, err = forgedQuote(t, e, b, id, 1)
		expectRefused(t, e, 1, resp, err, broker.ReasonQuote)
	})
	// A TPM rolled back to its factory state: the same seed in a fresh
	// process gives the same keys but reset and restart counts below what
	// the brokers have seen. (The in-process simulator keeps its counters
	// across re-opens, so the rolled-back TPM runs in a child process.)
	c := e.boot(1, d, attester.EKRSA)
	defer c.shutdown()
	t.Run("TPM state rollback", func(t *testing.T) {
		var n api.NonceResponse
		if err := postJSON(e, 1, api.PathNonce, api.NonceRequest{ApplianceID: c.c.ID()}, &n); err != nil {
			t.Fatal(err)
		}
		req := rolledBackQuote(t, n.Nonce, c.c.TLSPublicKey(), "image-1")
		req.ApplianceID = c.c.ID()
		resp, err := postAttest(e, 1, req)
		expectRefused(t, e, 1, resp, err, broker.ReasonRollback)
	})
	t.Run("revoked appliance", func(t *testing.T) {
		// Operators revoke on every broker (embassyctl does).
		e.opAll(http.MethodPost, api.PathAppliances+c.c.ID()+"/revoke", struct{}{})
		resp, err := rawAttest(t, e, c, 0, nil)
		expectRefused(t, e, 0, resp, err, broker.ReasonRevoked)
		_, err = c.c.AttestAll(ctxTimeout(t, 30*time.Second), fastRetry, 2)
		var ld *attest.LockdownError
		if !errors.As(err, &ld) {
			t.Fatalf("AttestAll after revocation: %v", err)
		}
	})
}

func postAttest(e *env, i int, req api.AttestRequest) (*api.AttestResponse, error) {
	var resp api.AttestResponse
	if err := postJSON(e, i, api.PathAttest, req, &resp); err != nil {
		return nil, err
	}
	return &resp, nil
}

// forgedQuote asks for a nonce as appliance id but quotes with b's TPM.
func forgedQuote(t *testing.T, e *env, b *appliance, id string, i int) (*api.AttestResponse, error) {
	var n api.NonceResponse
	if err := postJSON(e, i, api.PathNonce, api.NonceRequest{ApplianceID: id}, &n); err != nil {
		t.Fatal(err)
	}
	return postAttest(e, i, quoteRequest(t, b, id, n.Nonce))
}

func rsaOrECKey() ([]byte, error) {
	k, _ := pkiNewKey()
	return x509.MarshalPKIXPublicKey(k.Public())
}

func TestAuditTamperingDetected(t *testing.T) {
	e := newEnv(t, 1, 1)
	d := tpmtest.NewBootDigests("image-1")
	a := e.boot(1, d, attester.EKRSA)
	defer a.shutdown()
	e.enroll(a)
	e.approveImage(1, d)
	if _, err := a.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 1); err != nil {
		t.Fatal(err)
	}
	var ar audit.Response
	if err := e.op(0, http.MethodGet, api.PathAudit, nil, &ar); err != nil {
		t.Fatal(err)
	}
	if len(ar.Entries) < 5 {
		t.Fatalf("only %d audit entries", len(ar.Entries))
	}
	if _, err := audit.Verify(ar.Entries, &ar.Head); err != nil {
		t.Fatalf("untouched log: %v", err)
	}
	clone := func() []audit.Entry { return append([]audit.Entry(nil), ar.Entries...) }
	edited := clone()
	edited[2].Reason = "nothing to see"
	dropped := append(clone()[:2], ar.Entries[3:]...)
	reordered := clone()
	reordered[1], reordered[2] = reordered[2], reordered[1]
	truncated := clone()[:len(ar.Entries)-1]
	for name, entries := range map[string][]audit.Entry{"edited": edited, "dropped": dropped, "reordered": reordered, "truncated": truncated} {
		if _, err := audit.Verify(entries, &ar.Head); !errors.Is(err, audit.ErrTampered) {
			t.Errorf("%s entry not detected: %v", name, err)
		}
	}
	// The broker itself refuses to start on an edited log file.
	e.stop(0)
	path := filepath.Join(e.brokers[0].dir, "audit.log")
	raw, _ := os.ReadFile(path)
	os.WriteFile(path, bytes.Replace(raw, []byte(`"result":"ok"`), []byte(`"result":"OK"`), 1), 0o600)
	if _, err := broker.New(e.brokers[0].cfg); !errors.Is(err, audit.ErrTampered) {
		t.Fatalf("broker started on an edited audit log: %v", err)
	}
	os.WriteFile(path, raw, 0o600)
	e.start(0)
}

const rollbackChildEnv = "EMBASSY_TPM_ROLLBACK_CHILD"

func TestMain(m *testing.M) {
	if arg := os.Getenv(rollbackChildEnv); arg != "" {
		rollbackChild(arg)
		return
	}
	os.Exit(m.Run())
}

// rolledBackQuote runs a child process whose fresh simulator (seed 1)
// boots image and quotes over nonce and the TLS key.
func rolledBackQuote(t *testing.T, nonce, tlsPub []byte, image string) api.AttestRequest {
	t.Helper()
	arg, _ := json.Marshal(map[string]any{"nonce": nonce, "tls": tlsPub, "image": image})
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), rollbackChildEnv+"="+string(arg))
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("rolled-back TPM: %v", err)
	}
	var req api.AttestRequest
	if err := json.Unmarshal(out, &req); err != nil {
		t.Fatalf("rolled-back TPM output: %v", err)
	}
	return req
}

func rollbackChild(arg string) {
	var in struct {
		Nonce, TLS []byte
		Image      string
	}
	json.Unmarshal([]byte(arg), &in)
	t := &testing.T{}
	sim, err := simulatorWithSeed(1)
	if err != nil {
		os.Exit(1)
	}
	defer sim.Close()
	log := tpmtest.MeasuredBoot(t, sim, tpmtest.NewBootDigests(in.Image))
	a, err := attester.Open(sim, attester.EKRSA)
	if err != nil {
		os.Exit(1)
	}
	h := sha256.Sum256(in.TLS)
	q, err := a.Quote(api.ExtraData(in.Nonce, h[:]))
	if err != nil {
		os.Exit(1)
	}
	req := api.AttestRequest{Nonce: in.Nonce, Quote: q.Quote, Signature: q.RawSig, PCRs: map[int][]byte{}, EventLog: log, TLSPublic: in.TLS}
	for k, v := range q.GetPcrs().GetPcrs() {
		req.PCRs[int(k)] = v
	}
	json.NewEncoder(os.Stdout).Encode(req)
}

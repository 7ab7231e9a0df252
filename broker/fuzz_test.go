package broker

import (
	"bytes"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/google/go-attestation/attest"
	bolt "go.etcd.io/bbolt"

	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/images/manifest"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// fuzzNonce is the nonce the fuzzed attestations answer: it is put back
// in the broker's cache before every request, so that a quote made once
// over it stays fresh.
var fuzzNonce = bytes.Repeat([]byte{0x5a}, 32)

// fuzzBroker is a broker with one enrolled, activated and approved
// appliance (a simulated TPM's RSA EK) and an approved image, and the
// valid requests of that appliance's TPM: an enrollment of its ECC EK (not
// yet known), and an attestation of the measured image over fuzzNonce.
type fuzzBroker struct {
	b        *Broker
	id       string
	ak       *attest.AKPublic // the enrolled appliance's, for go-attestation
	enroll   *api.EnrollRequest
	activate *api.ActivateRequest // the enrolled appliance's answer, with its evidence
	attest   *api.AttestRequest
}

func newFuzzBroker(t testing.TB) *fuzzBroker {
	t.Helper()
	manu := tpmtest.NewCA(t, "Test TPM Manufacturer")
	digests := tpmtest.NewBootDigests("fuzzed image")
	sim := tpmtest.NewSimulator(t, manu, 1)
	eventLog := tpmtest.MeasuredBoot(t, sim, digests)

	svc, err := pki.NewRootCA("broker service CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	imagePub, imageKey, _ := ed25519.GenerateKey(rand.Reader)
	master := make([]byte, 32)
	rand.Read(master)
	b, err := New(Config{Name: "broker-fuzz", Dir: t.TempDir(), MasterKey: master, ManufacturerCAs: manu.Pool(),
		ImageKey: imagePub, ServiceCA: svc, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })

	enrollOf := func(a *attester.Attester) *api.EnrollRequest {
		ek, err := a.EKPublicDER()
		if err != nil {
			t.Fatal(err)
		}
		ak, err := a.AKPublic()
		if err != nil {
			t.Fatal(err)
		}
		return &api.EnrollRequest{EKPublic: ek, EKCert: a.EKCertDER(), AKPublic: ak}
	}
	a, err := attester.Open(sim, attester.EKRSA)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	enrolled := enrollOf(a)
	ch, err := b.Enroll(enrolled)
	if err != nil {
		t.Fatal(err)
	}
	ak, err := attest.ParseAKPublic(enrolled.AKPublic)
	if err != nil {
		t.Fatal(err)
	}
	secret, err := a.Activate(ch.CredentialBlob, ch.EncryptedSecret)
	if err != nil {
		t.Fatal(err)
	}
	aq, err := a.Quote(api.ActivationExtraData(secret))
	if err != nil {
		t.Fatal(err)
	}
	activation := &api.ActivateRequest{ApplianceID: ch.ApplianceID, Secret: secret, Quote: aq.GetQuote(), Signature: aq.GetRawSig(),
		PCRs: map[int][]byte{}, EventLog: eventLog}
	for i, v := range aq.GetPcrs().GetPcrs() {
		activation.PCRs[int(i)] = v
	}
	if err := b.Activate(activation); err != nil {
		t.Fatal(err)
	}
	fuzzOperator := audit.Actor{Kind: audit.ActorOperator, Subject: "CN=fuzz operator", Fingerprint: strings.Repeat("f", 64)}
	if err := b.ApproveEnrollment(fuzzOperator, ch.ApplianceID); err != nil {
		t.Fatal(err)
	}

	m := &manifest.Manifest{Schema: manifest.Schema, Version: 1,
		Kernel:       manifest.KernelInfo{Package: "linux-image-test-amd64", Version: "1", DebSHA256: hex.EncodeToString(make([]byte, 32)), Release: "test"},
		Stub:         manifest.PackageInfo{Package: "systemd-boot-efi", Version: "1", DebSHA256: hex.EncodeToString(make([]byte, 32))},
		Measurements: digests.Measurements()}
	for _, c := range []string{manifest.ComponentCmdline, manifest.ComponentInitramfs, manifest.ComponentKernel} {
		m.SetComponent(c, make([]byte, 32))
	}
	mb, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.ApproveManifest(fuzzOperator, mb, manifest.Sign(mb, imageKey)); err != nil {
		t.Fatal(err)
	}

	tlsKey, _ := pki.NewKey()
	tlsPub, _ := x509.MarshalPKIXPublicKey(&tlsKey.PublicKey)
	tlsHash := sha256.Sum256(tlsPub)
	q, err := a.Quote(api.ExtraData(fuzzNonce, tlsHash[:]))
	if err != nil {
		t.Fatal(err)
	}
	pcrValues := map[int][]byte{}
	for i, v := range q.GetPcrs().GetPcrs() {
		pcrValues[int(i)] = v
	}
	fb := &fuzzBroker{b: b, id: ch.ApplianceID, ak: ak, activate: activation,
		attest: &api.AttestRequest{ApplianceID: ch.ApplianceID, Nonce: fuzzNonce, Quote: q.GetQuote(), Signature: q.GetRawSig(),
			PCRs: pcrValues, EventLog: eventLog, TLSPublic: tlsPub, TLSAddresses: []string{"192.0.2.1"}}}
	a.Close()
	// The same TPM's ECC EK is another appliance, not enrolled yet.
	ecc, err := attester.Open(sim, attester.EKECC)
	if err != nil {
		t.Fatal(err)
	}
	defer ecc.Close()
	fb.enroll = enrollOf(ecc)
	fb.freshNonce()
	if _, err := b.Attest(fb.attest); err != nil {
		t.Fatalf("the seed attestation is refused: %v", err)
	}
	return fb
}

// freshNonce puts fuzzNonce back in the cache for the enrolled appliance.
func (fb *fuzzBroker) freshNonce() {
	fb.b.nonceM.Lock()
	defer fb.b.nonceM.Unlock()
	k := hex.EncodeToString(fuzzNonce)
	fb.b.nonces.remove(k)
	if rej := fb.b.nonces.add(k, nonceRecord{appliance: fb.id, known: true, expires: fb.b.now().Add(time.Minute)}, fb.b.now(), fb.b.cfg.NonceTTL); rej != nil {
		panic(rej)
	}
}

// state is everything an appliance request may change but the audit log
// and the nonce cache: appliance records, enrollments, manifests, shares.
func (fb *fuzzBroker) state(t *testing.T) []byte {
	t.Helper()
	var out bytes.Buffer
	err := fb.b.db.View(func(tx *bolt.Tx) error {
		for _, name := range [][]byte{bucketAppliances, bucketEnrollments, bucketManifests, bucketShares} {
			err := tx.Bucket(name).ForEach(func(k, v []byte) error {
				out.Write(name)
				out.WriteByte(0)
				out.Write(k)
				out.WriteByte(0)
				out.Write(v)
				out.WriteByte(0)
				return nil
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// FuzzApplianceAPI posts arbitrary bodies to the unauthenticated endpoints
// of the appliance API (enroll, activate, nonce, attest) of the real
// handler, seeded with a real TPM's enrollment and an attestation the
// broker accepts, so that mutations reach the EK certificate, the AK, the
// quote, the event log and the manifest. It proves that the broker never
// panics, answers every refusal with a 4xx (or the documented 503 of a
// full nonce cache), never changes an appliance record (but for the
// pending firmware of a boot refused for its firmware), an enrollment, a
// manifest or a share when it refuses, never issues a nonce when it
// refuses, and accepts only attestations that go-attestation verifies too.
func FuzzApplianceAPI(f *testing.F) {
	fb := newFuzzBroker(f)
	paths := []string{api.PathEnroll, api.PathActivate, api.PathNonce, api.PathAttest}
	seed := func(path string, v any) {
		b, err := json.Marshal(v)
		if err != nil {
			f.Fatal(err)
		}
		for i, p := range paths {
			if p == path {
				f.Add(uint8(i), b)
			}
		}
	}
	seed(api.PathEnroll, fb.enroll)
	seed(api.PathActivate, api.ActivateRequest{ApplianceID: api.ApplianceID(fb.enroll.EKPublic), Secret: make([]byte, 32)})
	seed(api.PathActivate, fb.activate)
	seed(api.PathNonce, api.NonceRequest{ApplianceID: fb.id})
	seed(api.PathAttest, fb.attest)
	h := fb.b.ApplianceHandler()
	f.Fuzz(func(t *testing.T, endpoint uint8, body []byte) {
		path := paths[int(endpoint)%len(paths)]
		fb.freshNonce()
		before, nonces := fb.state(t), fb.b.outstandingNonces()

		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, path, bytes.NewReader(body)))

		var answer api.Error
		if rec.Code != http.StatusOK {
			if err := json.Unmarshal(rec.Body.Bytes(), &answer); err != nil {
				t.Fatalf("%s: status %d without an API error: %q", path, rec.Code, rec.Body)
			}
		}
		switch {
		case rec.Code == http.StatusOK:
		case rec.Code == http.StatusServiceUnavailable && answer.Code == api.CodeTooManyNonces:
		case rec.Code >= 400 && rec.Code < 500:
		default:
			t.Fatalf("%s: status %d: %s", path, rec.Code, rec.Body)
		}
		if rec.Code != http.StatusOK {
			// A boot refused for its firmware is kept as the pending
			// firmware: the one change a refusal makes.
			if !bytes.Equal(fb.state(t), before) && answer.Code != api.CodeFirmware {
				t.Fatalf("%s refused with %d (%s) changed the broker's state", path, rec.Code, answer.Code)
			}
			if n := fb.b.outstandingNonces(); n > nonces {
				t.Fatalf("%s refused with %d issued a nonce", path, rec.Code)
			}
			return
		}
		if path != api.PathAttest {
			return
		}
		// What was accepted must verify with go-attestation, a quote
		// verifier we did not write: the AK's signature, the PCR values
		// and the binding of the nonce and TLS key.
		var req api.AttestRequest
		if err := json.Unmarshal(body, &req); err != nil {
			t.Fatalf("attestation accepted from a body that does not decode: %v", err)
		}
		var list []attest.PCR
		for i, v := range req.PCRs {
			list = append(list, attest.PCR{Index: i, Digest: v, DigestAlg: crypto.SHA256})
		}
		tlsHash := sha256.Sum256(req.TLSPublic)
		if err := fb.ak.Verify(attest.Quote{Quote: req.Quote, Signature: req.Signature}, list, api.ExtraData(req.Nonce, tlsHash[:])); err != nil {
			t.Fatalf("attestation accepted that go-attestation refuses: %v", err)
		}
	})
}

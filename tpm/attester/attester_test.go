package attester_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io"
	"testing"

	"github.com/google/go-tpm/legacy/tpm2"

	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/pcrs"
	"github.com/dataembassy/embassy/tpm/tpmtest"
	"github.com/dataembassy/embassy/tpm/verifier"
)

// TestProtocol runs both sides against a real TPM simulator for each EK
// type: EK certificate, credential activation, quote, sealed import.
func TestProtocol(t *testing.T) {
	ca := tpmtest.NewCA(t, "Test TPM Manufacturer")
	for _, ekType := range []attester.EKType{attester.EKRSA, attester.EKECC} {
		t.Run(string(ekType), func(t *testing.T) {
			sim := tpmtest.NewSimulator(t, ca, 1)
			a, err := attester.Open(sim, ekType)
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()

			// EK certificate chains to the manufacturer CA.
			if _, err := verifier.VerifyEKCert(a.EKCertDER(), a.EKPublic(), ca.Pool(), nil); err != nil {
				t.Fatal(err)
			}
			other := tpmtest.NewCA(t, "Other Manufacturer")
			if _, err := verifier.VerifyEKCert(a.EKCertDER(), a.EKPublic(), other.Pool(), nil); !errors.Is(err, verifier.ErrEKCert) {
				t.Fatalf("EK cert from an untrusted CA: %v", err)
			}

			// Credential activation.
			akPub, err := a.AKPublic()
			if err != nil {
				t.Fatal(err)
			}
			ak, err := verifier.ParseAK(akPub)
			if err != nil {
				t.Fatal(err)
			}
			secret := make([]byte, 32)
			rand.Read(secret)
			blob, enc, err := verifier.MakeCredential(a.EKPublic(), ak, secret)
			if err != nil {
				t.Fatal(err)
			}
			got, err := a.Activate(blob, enc)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, secret) {
				t.Fatal("activation returned another secret")
			}

			// Quote with extraData.
			extra := sha256.Sum256([]byte("nonce||tls key hash"))
			q, err := a.Quote(extra[:])
			if err != nil {
				t.Fatal(err)
			}
			info, err := verifier.VerifyQuote(ak, q, extra[:])
			if err != nil {
				t.Fatal(err)
			}
			if len(info.PCRs) != pcrs.Count || !info.Safe {
				t.Fatalf("quote info %+v", info)
			}
			wrong := sha256.Sum256([]byte("other nonce"))
			if _, err := verifier.VerifyQuote(ak, q, wrong[:]); !errors.Is(err, verifier.ErrExtraData) {
				t.Fatalf("wrong extraData: %v", err)
			}

			// Sealed import to EK + PCRs.
			key := make([]byte, 32)
			rand.Read(key)
			sealed, err := verifier.Seal(a.EKPublic(), key, info.PCRs)
			if err != nil {
				t.Fatal(err)
			}
			out, err := a.Import(sealed)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(out, key) {
				t.Fatal("import returned another secret")
			}
			// After PCR 9 changes, the same blob no longer opens.
			if err := tpm2.PCRExtend(sim, 9, tpm2.AlgSHA256, make([]byte, 32), ""); err != nil {
				t.Fatal(err)
			}
			if _, err := a.Import(sealed); err == nil {
				t.Fatal("import succeeded after PCR 9 changed")
			}
		})
	}
}

func TestCapturedBlobUselessOnAnotherTPM(t *testing.T) {
	ca := tpmtest.NewCA(t, "m")
	simA := tpmtest.NewSimulator(t, ca, 1)
	a, err := attester.Open(simA, attester.EKRSA)
	if err != nil {
		t.Fatal(err)
	}
	q, err := a.Quote(make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	akPub, _ := a.AKPublic()
	ak, _ := verifier.ParseAK(akPub)
	info, err := verifier.VerifyQuote(ak, q, make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	sealed, err := verifier.Seal(a.EKPublic(), []byte("volume key share"), info.PCRs)
	if err != nil {
		t.Fatal(err)
	}
	blob, enc, _ := verifier.MakeCredential(a.EKPublic(), ak, []byte("0123456789abcdef"))
	a.Close()
	simA.Close()

	// TPM B: another machine (another seed, so another EK).
	simB := tpmtest.NewSimulator(t, ca, 2)
	b, err := attester.Open(simB, attester.EKRSA)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if _, err := b.Import(sealed); err == nil {
		t.Fatal("a blob sealed to TPM A opened on TPM B")
	}
	// And B's AK cannot answer A's activation challenge.
	if _, err := b.Activate(blob, enc); err == nil {
		t.Fatal("TPM B activated a credential made for TPM A")
	}
}

func TestParseAKRejectsNonAK(t *testing.T) {
	ca := tpmtest.NewCA(t, "m")
	sim := tpmtest.NewSimulator(t, ca, 3)
	a, err := attester.Open(sim, attester.EKECC)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	// The EK is a decryption key, not a restricted signing key.
	for _, bad := range [][]byte{nil, []byte("junk")} {
		if _, err := verifier.ParseAK(bad); !errors.Is(err, verifier.ErrAKPublic) {
			t.Errorf("ParseAK(%q): %v", bad, err)
		}
	}
}

// busRecorder is a probe on the TPM's bus: it keeps every byte written to
// and read from the TPM.
type busRecorder struct {
	rw  io.ReadWriter
	bus bytes.Buffer
}

func (b *busRecorder) Write(p []byte) (int, error) {
	b.bus.Write(p)
	return b.rw.Write(p)
}

func (b *busRecorder) Read(p []byte) (int, error) {
	n, err := b.rw.Read(p)
	b.bus.Write(p[:n])
	return n, err
}

// TestBusCarriesNoSecret records the bytes between the attester and the
// TPM while it answers a credential challenge and unseals a share: the
// secrets the verifier made must come out of the attester and never
// appear on the bus, for either EK type.
func TestBusCarriesNoSecret(t *testing.T) {
	ca := tpmtest.NewCA(t, "m")
	for _, tc := range []struct {
		ekType attester.EKType
		seed   int64
	}{{attester.EKRSA, 11}, {attester.EKECC, 12}} {
		t.Run(string(tc.ekType), func(t *testing.T) {
			probe := &busRecorder{rw: tpmtest.NewSimulator(t, ca, tc.seed)}
			a, err := attester.Open(probe, tc.ekType)
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			akPub, _ := a.AKPublic()
			ak, err := verifier.ParseAK(akPub)
			if err != nil {
				t.Fatal(err)
			}
			credential := make([]byte, 32)
			rand.Read(credential)
			blob, enc, err := verifier.MakeCredential(a.EKPublic(), ak, credential)
			if err != nil {
				t.Fatal(err)
			}
			q, err := a.Quote(make([]byte, 32))
			if err != nil {
				t.Fatal(err)
			}
			info, err := verifier.VerifyQuote(ak, q, make([]byte, 32))
			if err != nil {
				t.Fatal(err)
			}
			share := make([]byte, 33)
			rand.Read(share)
			sealed, err := verifier.Seal(a.EKPublic(), share, info.PCRs)
			if err != nil {
				t.Fatal(err)
			}

			probe.bus.Reset()
			gotCredential, err := a.Activate(blob, enc)
			if err != nil {
				t.Fatal(err)
			}
			gotShare, err := a.Import(sealed)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(gotCredential, credential) || !bytes.Equal(gotShare, share) {
				t.Fatal("the attester returned other secrets than were made")
			}
			if probe.bus.Len() == 0 {
				t.Fatal("nothing recorded on the bus")
			}
			for name, secret := range map[string][]byte{"credential": credential, "share": share} {
				// Any 16 consecutive bytes of the secret would do.
				if bytes.Contains(probe.bus.Bytes(), secret[:16]) || bytes.Contains(probe.bus.Bytes(), secret[16:32]) {
					t.Errorf("the %s crossed the bus in the clear", name)
				}
			}
		})
	}
}

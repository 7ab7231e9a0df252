//go:build cgo

package hsm_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/dataembassy/embassy/broker/hsm"
	"github.com/dataembassy/embassy/broker/hsm/hsmtest"
	"github.com/dataembassy/embassy/broker/pki"
)

// TestSigner: a CA key generated in the token signs a root, an
// intermediate and a leaf that verify under the root, concurrently from
// pooled sessions; the token refuses a second key of the same label, and
// Sign refuses anything but a digest.
func TestSigner(t *testing.T) {
	cfg := hsmtest.Token(t, "broker-test", "root-ca")
	pub, err := hsm.GenerateSigningKey(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := hsm.GenerateSigningKey(cfg); !errors.Is(err, hsm.ErrKeyExists) {
		t.Fatalf("second GenerateSigningKey: %v, want ErrKeyExists", err)
	}
	s, err := hsm.OpenSigner(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !pub.Equal(s.Public()) {
		t.Fatal("the opened key's public half is not the generated one")
	}
	root, err := pki.RootCA("root", time.Hour, s)
	if err != nil {
		t.Fatal(err)
	}
	svcCfg := cfg
	svcCfg.KeyLabel = "service-ca"
	if _, err := hsm.GenerateSigningKey(svcCfg); err != nil {
		t.Fatal(err)
	}
	svcKey, err := hsm.OpenSigner(svcCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer svcKey.Close()
	svc, err := root.Intermediate("service CA", time.Hour, svcKey)
	if err != nil {
		t.Fatal(err)
	}
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(root.Cert)
	inter.AddCert(svc.Cert)
	errc := make(chan error, 8)
	for range cap(errc) {
		go func() {
			k, _ := pki.NewKey()
			leaf, err := svc.Leaf("appliance", []string{"127.0.0.1"}, &k.PublicKey, time.Minute)
			if err == nil {
				_, err = leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
			}
			errc <- err
		}()
	}
	for range cap(errc) {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	digest := sha256.Sum256([]byte("message"))
	for _, tc := range []struct {
		name   string
		digest []byte
		opts   crypto.SignerOpts
		ok     bool
	}{
		{"SHA-256 digest", digest[:], crypto.SHA256, true},
		{"not pre-hashed", []byte("message"), crypto.Hash(0), false},
		{"digest of the wrong length", digest[:20], crypto.SHA256, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sig, err := s.Sign(rand.Reader, tc.digest, tc.opts)
			if !tc.ok {
				if err == nil {
					t.Fatal("signed")
				}
				return
			}
			if err != nil || !ecdsa.VerifyASN1(pub, tc.digest, sig) {
				t.Fatalf("signature does not verify: %v", err)
			}
		})
	}
}

// TestSignerRefuses: OpenSigner refuses an unknown label, the master
// key's label (an AES key is no signing key), and an EC key whose private
// half may leave the token; DestroySigningKey removes a key pair.
func TestSignerRefuses(t *testing.T) {
	cfg := hsmtest.Token(t, "broker-test", "master")
	if err := hsm.GenerateKey(cfg); err != nil {
		t.Fatal(err)
	}
	p := rawSession(t, cfg)
	if _, _, err := p.ctx.GenerateKeyPair(p.sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_EC_KEY_PAIR_GEN, nil)},
		[]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, "weak"),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
		}, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, "weak"),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
		}); err != nil {
		t.Fatal(err)
	}
	p.close()
	gone := cfg
	gone.KeyLabel = "gone"
	if _, err := hsm.GenerateSigningKey(gone); err != nil {
		t.Fatal(err)
	}
	if err := hsm.DestroySigningKey(gone); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		label string
		want  error
	}{
		{"nobody", hsm.ErrKeyNotFound},
		{"master", hsm.ErrKeyNotFound},
		{"weak", hsm.ErrKeyExtractable},
		{"gone", hsm.ErrKeyNotFound},
	} {
		t.Run(tc.label, func(t *testing.T) {
			c := cfg
			c.KeyLabel = tc.label
			s, err := hsm.OpenSigner(c)
			if err == nil {
				s.Close()
				t.Fatal("opened")
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
}

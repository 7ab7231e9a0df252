//go:build cgo

package broker_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/x509"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/broker/hsm"
	"github.com/dataembassy/embassy/broker/hsm/hsmtest"
	"github.com/dataembassy/embassy/broker/seal"
	"github.com/dataembassy/embassy/protocol/identity"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// TestMasterKeyInSoftHSM2SurvivesRestart: a broker whose master key is a
// non-extractable key in a SoftHSM2 token stores a deposited share sealed
// by the token; stopped and started again (the token released and opened
// anew) it still releases the share to the appliance's attestation. The
// same state under a file master key is refused with a clear error.
func TestMasterKeyInSoftHSM2SurvivesRestart(t *testing.T) {
	cfg := hsmtest.Token(t, "broker-a", "master")
	if err := hsm.GenerateKey(cfg); err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, 1, 1)
	master := e.brokers[0].cfg.MasterKey
	s := e.useHSM(0, cfg)
	d := tpmtest.NewBootDigests("image-1")
	a := e.boot(1, d, attester.EKRSA)
	defer a.shutdown()
	secret := provision(t, e, a, d)

	e.stop(0)
	s.Close()
	// The share at rest is the token's record, not the plaintext.
	db, err := bolt.Open(filepath.Join(e.brokers[0].dir, "broker.db"), 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket([]byte("shares")).Get([]byte(a.c.ID() + "/disk-1"))
		if !bytes.HasPrefix(v, seal.Header(seal.PKCS11)) {
			t.Errorf("share at rest %x is not sealed by the token", v)
		}
		return nil
	})
	db.Close()

	s = e.useHSM(0, cfg)
	a.reboot(t, d)
	results, err := a.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 1)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := attest.Round(results).Keys(1)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(keys["disk-1"], secret) {
		t.Fatal("the share released after the restart does not recombine to the disk key")
	}
	e.stop(0)
	s.Close()

	// The same state with a file master key: the token's records do not
	// open, and the broker says why.
	e.brokers[0].cfg.Sealer, e.brokers[0].cfg.MasterKey = nil, master
	e.start(0)
	a.reboot(t, d)
	resp, err := rawAttest(t, e, a, 0, nil)
	if err == nil {
		t.Fatalf("released %d shares sealed by the token under the file key", len(resp.Shares))
	}
	if !strings.Contains(err.Error(), "sealed under a PKCS#11 master key, this broker uses a file master key") {
		t.Fatalf("refusal %q does not name the backends", err)
	}
}

// TestCAKeysInSoftHSM2: a broker whose root CA and service CA keys are
// non-extractable ECDSA P-256 keys in its SoftHSM2 token (beside the
// master key) takes a deposit and, after a reboot, releases the share
// over its HTTPS API; the certificate it issued to the appliance, signed
// in the token, verifies under the broker's root for the appliance's id.
func TestCAKeysInSoftHSM2(t *testing.T) {
	cfg := hsmtest.Token(t, "broker-a", "master")
	if err := hsm.GenerateKey(cfg); err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, 1, 1)
	s := e.useHSM(0, cfg)
	defer s.Close()
	closeCA := e.useHSMCA(0, cfg)
	defer closeCA()
	if _, ok := e.brokers[0].cfg.ServiceCA.Key.(*hsm.Signer); !ok {
		t.Fatalf("service CA key is a %T", e.brokers[0].cfg.ServiceCA.Key)
	}
	d := tpmtest.NewBootDigests("image-1")
	a := e.boot(1, d, attester.EKRSA)
	defer a.shutdown()
	secret := provision(t, e, a, d)
	a.reboot(t, d)
	results, err := a.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 1)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := attest.Round(results).Keys(1)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(keys["disk-1"], secret) {
		t.Fatal("the released share does not recombine to the disk key")
	}
	c := results[0].Certificate
	if c == nil || len(c.Certificate) != 2 {
		t.Fatalf("certificate %+v", c)
	}
	var chain []*x509.Certificate
	for _, der := range c.Certificate {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, cert)
	}
	if chain[1].PublicKeyAlgorithm != x509.ECDSA || !chain[1].PublicKey.(*ecdsa.PublicKey).Equal(e.brokers[0].cfg.ServiceCA.Key.Public()) {
		t.Fatal("the appliance's certificate is not issued by the token's service CA")
	}
	id, err := identity.Verify(chain, e.brokers[0].root.Pool(), time.Now(), x509.ExtKeyUsageServerAuth)
	if err != nil || id != a.c.ID() {
		t.Fatalf("appliance certificate: id %q, %v", id, err)
	}
}

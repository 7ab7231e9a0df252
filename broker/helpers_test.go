package broker_test

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"

	"github.com/google/go-tpm-tools/simulator"

	"github.com/dataembassy/embassy/broker/pki"
)

func simulatorWithSeed(seed int64) (*simulator.Simulator, error) {
	return simulator.GetWithFixedSeedInsecure(seed)
}

func pkiNewKey() (*ecdsa.PrivateKey, error) { return pki.NewKey() }

func ed25519GenerateKey() (ed25519.PublicKey, ed25519.PrivateKey, error) {
	return ed25519.GenerateKey(rand.Reader)
}

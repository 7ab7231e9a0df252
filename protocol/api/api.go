// Package api defines the JSON messages both sides of the key brokers'
// two HTTPS APIs speak: the appliance API (nonce, enrollment, attestation,
// share deposit; appliance.go), the operator API (enrollment approval,
// image approval, floor, disk approval, revocation, state, audit;
// operator.go), the appliance's own challenge endpoint (challenge.go), the
// health report an appliance attaches to each attestation (health.go) and
// the error body of every refusal with its machine-readable code
// (errors.go). The appliance, the brokers and the operator's client all
// import it; it imports neither of them.
package api

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"regexp"
)

// MaxBody bounds every request body.
const MaxBody = 4 << 20

var applianceID = regexp.MustCompile(`^[0-9a-f]{32}$`)

// ApplianceID derives an appliance's identity from its EK public key.
func ApplianceID(ekPublicDER []byte) string {
	sum := sha256.Sum256(ekPublicDER)
	return hex.EncodeToString(sum[:16])
}

// ApplianceIDFromKey derives the identity from a parsed EK.
func ApplianceIDFromKey(ek any) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(ek)
	if err != nil {
		return "", err
	}
	return ApplianceID(der), nil
}

// CheckApplianceID validates an appliance id.
func CheckApplianceID(id string) error {
	if !applianceID.MatchString(id) {
		return fmt.Errorf("appliance id %q is not 32 lowercase hex digits", id)
	}
	return nil
}

// CheckDiskID validates a disk id (a LUKS UUID): 1 to 64 lowercase
// letters, digits and dashes.
func CheckDiskID(id string) error {
	if len(id) < 1 || len(id) > 64 {
		return fmt.Errorf("disk id of %d bytes: want 1 to 64", len(id))
	}
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return fmt.Errorf("disk id %q: only lowercase letters, digits and dashes", id)
		}
	}
	return nil
}

// ExtraData binds a quote to a broker nonce and the appliance's ephemeral
// TLS key: SHA-256("embassy-attest-v1" || nonce || SHA-256(TLS public key)).
func ExtraData(nonce, tlsKeySHA256 []byte) []byte {
	h := sha256.New()
	h.Write([]byte("embassy-attest-v1"))
	h.Write(nonce)
	h.Write(tlsKeySHA256)
	return h.Sum(nil)
}

// ActivationExtraData binds the quote an appliance sends with its
// activation answer to that enrollment's credential-activation secret:
// SHA-256("embassy-activate-v1" || secret). Only the TPM that activated
// the credential knows the secret, so the quote is fresh and its AK is the
// one just activated.
func ActivationExtraData(secret []byte) []byte {
	h := sha256.New()
	h.Write([]byte("embassy-activate-v1"))
	h.Write(secret)
	return h.Sum(nil)
}

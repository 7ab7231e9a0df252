//go:build cgo

package hsm

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
	"math/big"

	"github.com/miekg/pkcs11"
)

// oidP256 is the DER encoding of the named curve P-256 (prime256v1), the
// CKA_EC_PARAMS of the CA keys.
var oidP256 = []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}

// Signer is a CA's ECDSA P-256 signing key in the token, as a
// crypto.Signer: the private key is generated there, sensitive and not
// extractable, and signs digests with CKM_ECDSA inside the token. It is
// safe for concurrent use: each signature takes a session from a small
// pool.
type Signer struct {
	*token
	key pkcs11.ObjectHandle
	pub *ecdsa.PublicKey
}

// GenerateSigningKey generates an ECDSA P-256 key pair labelled
// cfg.KeyLabel in the token and returns its public key. The private key is
// on the token, private, sensitive, not extractable and may only sign; the
// public key object is kept beside it (serve reads the public key from
// it). It refuses a label the token already holds for an EC key.
func GenerateSigningKey(cfg Config) (*ecdsa.PublicKey, error) {
	ctx, _, sh, err := session(cfg, true)
	if err != nil {
		return nil, err
	}
	defer releaseModule(cfg.Module)
	defer ctx.CloseSession(sh)
	for _, class := range []uint{pkcs11.CKO_PRIVATE_KEY, pkcs11.CKO_PUBLIC_KEY} {
		objs, err := findObjects(ctx, sh, class, pkcs11.CKK_EC, cfg.KeyLabel)
		if err != nil {
			return nil, err
		}
		if len(objs) > 0 {
			return nil, fmt.Errorf("%w: %q", ErrKeyExists, cfg.KeyLabel)
		}
	}
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return nil, err
	}
	pubTmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_EC),
		pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, oidP256),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, cfg.KeyLabel),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
	}
	privTmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_EC),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, cfg.KeyLabel),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
	}
	pubObj, _, err := ctx.GenerateKeyPair(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_EC_KEY_PAIR_GEN, nil)}, pubTmpl, privTmpl)
	if err != nil {
		return nil, fmt.Errorf("generate ECDSA P-256 key %q in token %q: %w", cfg.KeyLabel, cfg.TokenLabel, err)
	}
	return publicKey(ctx, sh, pubObj)
}

// DestroySigningKey destroys the EC key pair labelled cfg.KeyLabel: for
// undoing a GenerateSigningKey whose key was never put to use (an init
// that failed after it). A label the token does not hold is not an error.
func DestroySigningKey(cfg Config) error {
	ctx, _, sh, err := session(cfg, true)
	if err != nil {
		return err
	}
	defer releaseModule(cfg.Module)
	defer ctx.CloseSession(sh)
	var errs []error
	for _, class := range []uint{pkcs11.CKO_PRIVATE_KEY, pkcs11.CKO_PUBLIC_KEY} {
		objs, err := findObjects(ctx, sh, class, pkcs11.CKK_EC, cfg.KeyLabel)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, o := range objs {
			if err := ctx.DestroyObject(sh, o); err != nil {
				errs = append(errs, fmt.Errorf("destroy key %q: %w", cfg.KeyLabel, err))
			}
		}
	}
	return errors.Join(errs...)
}

// publicKey reads an EC public key object as a P-256 key.
func publicKey(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle, obj pkcs11.ObjectHandle) (*ecdsa.PublicKey, error) {
	attrs, err := ctx.GetAttributeValue(sh, obj, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, nil),
		pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, nil),
	})
	if err != nil {
		return nil, fmt.Errorf("read the public key: %w", err)
	}
	if !bytes.Equal(attrs[0].Value, oidP256) {
		return nil, fmt.Errorf("%w (curve parameters %x, not P-256)", ErrKeyExtractable, attrs[0].Value)
	}
	// CKA_EC_POINT is the DER OCTET STRING of the uncompressed point;
	// some tokens give the bare point.
	point := attrs[1].Value
	var inner []byte
	if rest, err := asn1.Unmarshal(point, &inner); err == nil && len(rest) == 0 {
		point = inner
	}
	pub, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), point)
	if err != nil {
		return nil, fmt.Errorf("the token's public key: %w", err)
	}
	return pub, nil
}

// OpenSigner finds the ECDSA P-256 key pair labelled cfg.KeyLabel in the
// token and returns a Signer using it. The private key must be sensitive
// and not extractable. Close releases the token.
func OpenSigner(cfg Config) (*Signer, error) {
	tok, err := openToken(cfg)
	if err != nil {
		return nil, err
	}
	s := &Signer{token: tok}
	if err := s.find(cfg); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

func (s *Signer) find(cfg Config) error {
	var objs [2][]pkcs11.ObjectHandle
	for i, class := range []uint{pkcs11.CKO_PRIVATE_KEY, pkcs11.CKO_PUBLIC_KEY} {
		o, err := findObjects(s.ctx, s.login, class, pkcs11.CKK_EC, cfg.KeyLabel)
		switch {
		case err != nil:
			return err
		case len(o) == 0:
			return fmt.Errorf("%w: EC key %q in token %q", ErrKeyNotFound, cfg.KeyLabel, cfg.TokenLabel)
		case len(o) > 1:
			return fmt.Errorf("%w: %q", ErrAmbiguousKey, cfg.KeyLabel)
		}
		objs[i] = o
	}
	s.key = objs[0][0]
	attrs, err := s.ctx.GetAttributeValue(s.login, s.key, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_ID, nil),
	})
	if err != nil {
		return fmt.Errorf("read the key's attributes: %w", err)
	}
	if sensitive, extractable := attrBool(attrs[0]), attrBool(attrs[1]); !sensitive || extractable {
		return fmt.Errorf("%w (EC key %q: sensitive %t, extractable %t)", ErrKeyExtractable, cfg.KeyLabel, sensitive, extractable)
	}
	id, err := s.ctx.GetAttributeValue(s.login, objs[1][0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_ID, nil)})
	if err != nil {
		return fmt.Errorf("read the public key's attributes: %w", err)
	}
	if !bytes.Equal(id[0].Value, attrs[2].Value) {
		return fmt.Errorf("%w: the private and public keys labelled %q have different CKA_IDs", ErrAmbiguousKey, cfg.KeyLabel)
	}
	s.pub, err = publicKey(s.ctx, s.login, objs[1][0])
	return err
}

// Public returns the key's public half.
func (s *Signer) Public() crypto.PublicKey { return s.pub }

// ecdsaSignature is the ASN.1 form of an ECDSA signature that x509 wants.
type ecdsaSignature struct{ R, S *big.Int }

// Sign signs digest (a hash made by the caller, as opts says) with
// CKM_ECDSA in the token and returns the ASN.1 DER signature. rand is not
// used: the token draws its own nonce.
func (s *Signer) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if h := opts.HashFunc(); h == 0 || len(digest) != h.Size() {
		return nil, fmt.Errorf("PKCS#11 ECDSA signs a digest: got %d bytes for hash %v", len(digest), h)
	}
	raw, err := s.do(func(sh pkcs11.SessionHandle) ([]byte, error) {
		if err := s.ctx.SignInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}, s.key); err != nil {
			return nil, fmt.Errorf("PKCS#11 ECDSA sign: %w", err)
		}
		sig, err := s.ctx.Sign(sh, digest)
		if err != nil {
			return nil, fmt.Errorf("PKCS#11 ECDSA sign: %w", err)
		}
		return sig, nil
	})
	if err != nil {
		return nil, err
	}
	// CKM_ECDSA returns r||s, each the curve's size.
	if len(raw) != 64 {
		return nil, fmt.Errorf("PKCS#11 ECDSA sign returned %d bytes, want 64 (r||s on P-256)", len(raw))
	}
	return asn1.Marshal(ecdsaSignature{R: new(big.Int).SetBytes(raw[:32]), S: new(big.Int).SetBytes(raw[32:])})
}

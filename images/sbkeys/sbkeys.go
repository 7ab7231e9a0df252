// Package sbkeys holds the home state's UEFI Secure Boot keys: the
// platform key (PK), the key-exchange key (KEK) and the signature-database
// key (db) whose certificate the firmware trusts to run the boot image.
// mkimage creates local-default keys under the cache folder on first use
// (the demo and the tests); a production build passes a folder with the
// home state's own, where only the db private key is needed (the PK and
// KEK certificates go into the firmware variables; their private keys stay
// with their custodians).
package sbkeys

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"debug/pe"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"time"

	"github.com/foxboron/go-uefi/authenticode"
	"github.com/foxboron/go-uefi/pkcs7"

	"github.com/dataembassy/embassy/images/ovmfvars"
)

// Key is a certificate and, where this build holds it, its private key.
type Key struct {
	Cert   *x509.Certificate
	Signer crypto.Signer // nil where the key is held elsewhere
}

// Keys are the three Secure Boot keys.
type Keys struct {
	PK, KEK, DB Key
}

// Roles, in the order of the files in a key folder.
var roles = []string{"pk", "kek", "db"}

// ErrNoSigningKey is returned when the db private key is not in the folder.
var ErrNoSigningKey = errors.New("no db private key: the boot image cannot be signed")

// Load reads <dir>/{pk,kek,db}.pem (certificates) and, where present,
// <dir>/{pk,kek,db}.key (PKCS#8 private keys). The db key is required to
// sign.
func Load(dir string) (Keys, error) {
	var ks Keys
	for i, role := range roles {
		k, err := loadKey(dir, role)
		if err != nil {
			return Keys{}, err
		}
		*[]*Key{&ks.PK, &ks.KEK, &ks.DB}[i] = k
	}
	if ks.DB.Signer == nil {
		return Keys{}, fmt.Errorf("%s: %w", dir, ErrNoSigningKey)
	}
	return ks, nil
}

func loadKey(dir, role string) (Key, error) {
	pemBytes, err := os.ReadFile(filepath.Join(dir, role+".pem"))
	if err != nil {
		return Key{}, fmt.Errorf("secure boot %s certificate: %w", role, err)
	}
	blk, _ := pem.Decode(pemBytes)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return Key{}, fmt.Errorf("secure boot %s certificate: no PEM CERTIFICATE block", role)
	}
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return Key{}, fmt.Errorf("secure boot %s certificate: %w", role, err)
	}
	if _, ok := cert.PublicKey.(*rsa.PublicKey); !ok {
		return Key{}, fmt.Errorf("secure boot %s certificate: %T key; UEFI firmware verifies RSA only", role, cert.PublicKey)
	}
	k := Key{Cert: cert}
	keyBytes, err := os.ReadFile(filepath.Join(dir, role+".key"))
	if errors.Is(err, os.ErrNotExist) {
		return k, nil
	}
	if err != nil {
		return Key{}, fmt.Errorf("secure boot %s key: %w", role, err)
	}
	blk, _ = pem.Decode(keyBytes)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		return Key{}, fmt.Errorf("secure boot %s key: no PEM PRIVATE KEY block", role)
	}
	priv, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return Key{}, fmt.Errorf("secure boot %s key: %w", role, err)
	}
	signer, ok := priv.(crypto.Signer)
	if !ok || !publicKeysEqual(signer.Public(), cert.PublicKey) {
		return Key{}, fmt.Errorf("secure boot %s key does not match its certificate", role)
	}
	k.Signer = signer
	return k, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	ea, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ea.Equal(b)
}

// EnsureDev returns the local-default keys in dir, creating any that are
// missing: self-signed RSA-2048 certificates, each key signed by the one
// above it as UEFI expects (PK self-signed, KEK by PK, db by KEK).
func EnsureDev(dir string) (Keys, error) {
	if ks, err := Load(dir); err == nil {
		return ks, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return Keys{}, fmt.Errorf("create secure boot key folder: %w", err)
	}
	var parent Key
	for _, role := range roles {
		k, err := newKey(role, parent)
		if err != nil {
			return Keys{}, err
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(k.Signer)
		if err != nil {
			return Keys{}, err
		}
		if err := os.WriteFile(filepath.Join(dir, role+".key"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
			return Keys{}, err
		}
		if err := os.WriteFile(filepath.Join(dir, role+".pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: k.Cert.Raw}), 0o644); err != nil {
			return Keys{}, err
		}
		parent = k
	}
	return Load(dir)
}

func newKey(role string, parent Key) (Key, error) {
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return Key{}, fmt.Errorf("generate secure boot %s key: %w", role, err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return Key{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "embassy local default secure boot " + role, Organization: []string{"embassy local default"}},
		NotBefore:             time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC),
		NotAfter:              time.Date(2046, 1, 1, 0, 0, 0, 0, time.UTC),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  role != "db",
	}
	issuer, signer := tmpl, crypto.Signer(priv)
	if parent.Cert != nil {
		issuer, signer = parent.Cert, parent.Signer
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer, &priv.PublicKey, signer)
	if err != nil {
		return Key{}, fmt.Errorf("create secure boot %s certificate: %w", role, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return Key{}, err
	}
	return Key{Cert: cert, Signer: priv}, nil
}

// Owner is the signature-owner GUID recorded with every enrolled entry,
// derived from the PK so that the same keys always give the same VARS.
func (ks Keys) Owner() ovmfvars.GUID {
	sum := sha256.Sum256(ks.PK.Cert.Raw)
	var g ovmfvars.GUID
	copy(g[:], sum[:16])
	g[7] = g[7]&0x0f | 0x40 // version 4 layout, as a random GUID would be
	g[8] = g[8]&0x3f | 0x80
	return g
}

// Variables returns the firmware variables that enroll the keys and turn
// Secure Boot on (see ovmfvars.SecureBootVariables), stamped at.
func (ks Keys) Variables(dbx [][32]byte, at time.Time) ([]ovmfvars.Variable, error) {
	return ovmfvars.SecureBootVariables(ks.Enrolled(dbx), at)
}

// Enrolled is what firmware holding these keys (and dbx) has enrolled.
func (ks Keys) Enrolled(dbx [][32]byte) ovmfvars.SecureBootKeys {
	return ovmfvars.SecureBootKeys{PK: ks.PK.Cert, KEK: ks.KEK.Cert, DB: ks.DB.Cert, DBX: dbx, Owner: ks.Owner()}
}

// SignPE returns img signed by the db key alone: Authenticode (SHA-256,
// PKCS#7) in a certificate table that replaces any the image had (the
// Debian kernel's own signature, say), so that nothing but the home
// state's key vouches for it. The image's Authenticode digest, which PCR4
// records, does not change.
func (ks Keys) SignPE(img []byte) ([]byte, error) {
	if ks.DB.Signer == nil {
		return nil, ErrNoSigningKey
	}
	img, err := StripSignatures(img)
	if err != nil {
		return nil, err
	}
	pe, err := authenticode.Parse(bytes.NewReader(img))
	if err != nil {
		return nil, fmt.Errorf("parse PE image to sign: %w", err)
	}
	// No authenticated attributes: they would carry the signing time,
	// and the image would differ on every build. RSA PKCS#1 v1.5 over
	// the Authenticode content itself is deterministic, and firmware
	// (edk2's Pkcs7Verify: TestDiskImageBoots), sbverify and osslsigncode
	// accept it. go-uefi's own verifier does not (it assumes attributes),
	// so this package has no Verify: the tests check with sbverify and
	// osslsigncode.
	if _, err := pe.Sign(ks.DB.Signer, ks.DB.Cert, pkcs7.NoAttr()); err != nil {
		return nil, fmt.Errorf("sign PE image: %w", err)
	}
	return pe.Bytes(), nil
}

// StripSignatures returns img without its certificate table: the security
// data directory is zeroed and the table, which PE keeps at the end of the
// file, cut off. An image without one is returned as is.
func StripSignatures(img []byte) ([]byte, error) {
	f, err := pe.NewFile(bytes.NewReader(img))
	if err != nil {
		return nil, fmt.Errorf("parse PE image: %w", err)
	}
	defer f.Close()
	opt, ok := f.OptionalHeader.(*pe.OptionalHeader64)
	if !ok || opt.NumberOfRvaAndSizes <= pe.IMAGE_DIRECTORY_ENTRY_SECURITY {
		return nil, errors.New("not a PE32+ image with a security data directory")
	}
	dir := opt.DataDirectory[pe.IMAGE_DIRECTORY_ENTRY_SECURITY]
	if dir.Size == 0 {
		return img, nil
	}
	if uint64(dir.VirtualAddress)+uint64(dir.Size) != uint64(len(img)) {
		return nil, fmt.Errorf("certificate table at %#x+%#x is not at the end of the %d-byte image", dir.VirtualAddress, dir.Size, len(img))
	}
	// The data directory's offset in the file: after the PE signature,
	// the COFF header and the optional header's fixed part.
	peOff := int(binary.LittleEndian.Uint32(img[0x3c:]))
	dirOff := peOff + 4 + 20 + 112 + 8*pe.IMAGE_DIRECTORY_ENTRY_SECURITY
	if dirOff+8 > len(img) || binary.LittleEndian.Uint32(img[dirOff:]) != dir.VirtualAddress {
		return nil, errors.New("security data directory not where PE32+ puts it")
	}
	out := bytes.Clone(img[:dir.VirtualAddress])
	binary.LittleEndian.PutUint64(out[dirOff:], 0)
	return out, nil
}

// Package manifest defines the signed reference manifest of an appliance
// image: its version, the SHA-256 of every component and the measured-boot
// measurements a verifier expects to see in PCR4 (the signed UKI), PCR7
// (Secure Boot with the home state's keys), PCR9 (what the kernel's EFI
// stub measures) and PCR11 (systemd-stub's UKI sections). The manifest is
// encoded canonically (fixed field order, no insignificant whitespace) and
// signed with ed25519 over exactly those bytes.
package manifest

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"sort"
	"strings"
)

// Schema identifies this manifest format.
const Schema = "embassy-image-manifest/v2"

// MaxSize bounds a manifest file; anything larger is rejected unread.
const MaxSize = 64 << 10

// File names of an image folder: the manifest, its signature and the
// components.
const (
	File               = "manifest.json"
	SignatureFile      = "manifest.sig"
	ComponentKernel    = "vmlinuz"
	ComponentInitramfs = "initramfs.cpio.zst"
	ComponentCmdline   = "cmdline"
	// ComponentUKI is the signed Unified Kernel Image, and ComponentDisk
	// the disk image that carries it (what is written to a server's boot
	// disk).
	ComponentUKI  = "embassy.efi"
	ComponentDisk = "embassy.img"
)

// MaxSecureBootEvents bounds the predicted PCR7 events.
const MaxSecureBootEvents = 16

// Manifest is the reference description of one image.
type Manifest struct {
	Schema  string `json:"schema"`
	Version uint64 `json:"version"`
	// Kernel records where the kernel came from.
	Kernel KernelInfo `json:"kernel"`
	// Stub records where the UKI's systemd-stub came from.
	Stub PackageInfo `json:"stub"`
	// Components maps each artifact's file name to its SHA-256 (hex).
	Components []Component `json:"components"`
	// Measurements are the expected measured-boot event digests (SHA-256, hex).
	Measurements Measurements `json:"measurements"`
}

// KernelInfo names the Debian kernel package the image was built from.
type KernelInfo struct {
	Package string `json:"package"`
	Version string `json:"version"`
	// DebSHA256 is the SHA-256 of the downloaded .deb.
	DebSHA256 string `json:"deb_sha256"`
	Release   string `json:"release"`
}

// PackageInfo names a Debian package and the SHA-256 of its .deb.
type PackageInfo struct {
	Package   string `json:"package"`
	Version   string `json:"version"`
	DebSHA256 string `json:"deb_sha256"`
}

// Component is one artifact and its digest.
type Component struct {
	Name   string `json:"name"`
	SHA256 string `json:"sha256"`
}

// Measurements are what the firmware, systemd-stub and the kernel's EFI
// stub extend into the TPM when a server boots this image's disk under
// Secure Boot with the home state's keys. Every digest is SHA-256, hex.
type Measurements struct {
	// UKIAuthenticode is the PE Authenticode digest of the signed UKI,
	// the one EV_EFI_BOOT_SERVICES_APPLICATION event of PCR4.
	UKIAuthenticode string `json:"pcr4_uki_authenticode"`
	// SecureBoot are the digests of PCR7's events in log order: the
	// SecureBoot, PK, KEK, db and dbx variables as enrolled, the
	// separator, and the db certificate as the authority that verified
	// the UKI.
	SecureBoot []string `json:"pcr7_secure_boot"`
	// LoadOptions is the digest of the PCR9 "LOADED_IMAGE::LoadOptions" event.
	LoadOptions string `json:"pcr9_load_options"`
	// Initrd is the digest of the PCR9 "Linux initrd" event.
	Initrd string `json:"pcr9_initrd"`
	// UKISections is the value of PCR11 after systemd-stub measured the
	// UKI's sections (name, then contents, of each).
	UKISections string `json:"pcr11_uki_sections"`
}

var (
	hexDigest       = regexp.MustCompile(`^[0-9a-f]{64}$`)
	safeName        = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)
	printable       = regexp.MustCompile(`^[\x20-\x7e]{0,256}$`)
	ErrNotCanonical = errors.New("manifest is not canonically encoded")
)

// ErrBadSignature is returned when a signature does not verify.
var ErrBadSignature = errors.New("manifest signature does not verify")

// Validate checks every field of m.
func (m *Manifest) Validate() error {
	if m.Schema != Schema {
		return fmt.Errorf("manifest schema %q, want %q", m.Schema, Schema)
	}
	if m.Version == 0 {
		return errors.New("manifest version must be at least 1")
	}
	for name, v := range map[string]string{"kernel.package": m.Kernel.Package, "kernel.version": m.Kernel.Version, "kernel.release": m.Kernel.Release} {
		if v == "" || !printable.MatchString(v) {
			return fmt.Errorf("manifest %s %q is empty or not printable ASCII", name, v)
		}
	}
	if !hexDigest.MatchString(m.Kernel.DebSHA256) {
		return fmt.Errorf("manifest kernel.deb_sha256 %q is not a lowercase hex SHA-256", m.Kernel.DebSHA256)
	}
	for name, v := range map[string]string{"stub.package": m.Stub.Package, "stub.version": m.Stub.Version} {
		if v == "" || !printable.MatchString(v) {
			return fmt.Errorf("manifest %s %q is empty or not printable ASCII", name, v)
		}
	}
	if !hexDigest.MatchString(m.Stub.DebSHA256) {
		return fmt.Errorf("manifest stub.deb_sha256 %q is not a lowercase hex SHA-256", m.Stub.DebSHA256)
	}
	if len(m.Components) == 0 {
		return errors.New("manifest lists no components")
	}
	for i, c := range m.Components {
		if !safeName.MatchString(c.Name) {
			return fmt.Errorf("manifest component %d: bad name %q", i, c.Name)
		}
		if !hexDigest.MatchString(c.SHA256) {
			return fmt.Errorf("manifest component %q: digest %q is not a lowercase hex SHA-256", c.Name, c.SHA256)
		}
		if i > 0 && m.Components[i-1].Name >= c.Name {
			return fmt.Errorf("manifest components are not sorted and unique at %q", c.Name)
		}
	}
	for name, v := range map[string]string{
		"pcr4_uki_authenticode": m.Measurements.UKIAuthenticode,
		"pcr9_load_options":     m.Measurements.LoadOptions,
		"pcr9_initrd":           m.Measurements.Initrd,
		"pcr11_uki_sections":    m.Measurements.UKISections,
	} {
		if !hexDigest.MatchString(v) {
			return fmt.Errorf("manifest measurement %s %q is not a lowercase hex SHA-256", name, v)
		}
	}
	if n := len(m.Measurements.SecureBoot); n == 0 || n > MaxSecureBootEvents {
		return fmt.Errorf("manifest pcr7_secure_boot has %d events, want 1 to %d", n, MaxSecureBootEvents)
	}
	for i, d := range m.Measurements.SecureBoot {
		if !hexDigest.MatchString(d) {
			return fmt.Errorf("manifest pcr7_secure_boot event %d %q is not a lowercase hex SHA-256", i, d)
		}
	}
	return nil
}

// Component returns the digest recorded for name.
func (m *Manifest) Component(name string) (string, bool) {
	for _, c := range m.Components {
		if c.Name == name {
			return c.SHA256, true
		}
	}
	return "", false
}

// SetComponent records a component digest, keeping the list sorted.
func (m *Manifest) SetComponent(name string, digest []byte) {
	d := hex.EncodeToString(digest)
	for i := range m.Components {
		if m.Components[i].Name == name {
			m.Components[i].SHA256 = d
			return
		}
	}
	m.Components = append(m.Components, Component{Name: name, SHA256: d})
	sort.Slice(m.Components, func(i, j int) bool { return m.Components[i].Name < m.Components[j].Name })
}

// Marshal validates m and returns its canonical encoding: compact JSON in
// struct field order with a trailing newline.
func (m *Manifest) Marshal() ([]byte, error) {
	if err := m.Validate(); err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(m); err != nil {
		return nil, fmt.Errorf("encode manifest: %w", err)
	}
	return buf.Bytes(), nil
}

// Parse decodes and validates a manifest. It rejects unknown fields,
// trailing data and any encoding that is not the canonical one.
func Parse(b []byte) (*Manifest, error) {
	if len(b) > MaxSize {
		return nil, fmt.Errorf("manifest is %d bytes, more than the %d allowed", len(b), MaxSize)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var m Manifest
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("decode manifest: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("decode manifest: trailing data after the JSON object")
	}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	canon, err := m.Marshal()
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(canon, b) {
		return nil, ErrNotCanonical
	}
	return &m, nil
}

// Sign returns the detached signature file content for a canonical manifest:
// the base64 of the ed25519 signature and a newline.
func Sign(canonical []byte, key ed25519.PrivateKey) []byte {
	sig := ed25519.Sign(key, canonical)
	return []byte(base64.StdEncoding.EncodeToString(sig) + "\n")
}

// Verify checks the detached signature over manifestBytes with pub and then
// parses the manifest. Nothing of an unverified manifest is returned.
func Verify(manifestBytes, sigFile []byte, pub ed25519.PublicKey) (*Manifest, error) {
	if len(pub) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("image-signing public key has %d bytes, want %d", len(pub), ed25519.PublicKeySize)
	}
	if len(sigFile) > 256 {
		return nil, fmt.Errorf("signature file is %d bytes: too long", len(sigFile))
	}
	sig, err := base64.StdEncoding.Strict().DecodeString(strings.TrimSuffix(string(sigFile), "\n"))
	if err != nil {
		return nil, fmt.Errorf("decode manifest signature: %w", err)
	}
	if len(sig) != ed25519.SignatureSize {
		return nil, fmt.Errorf("manifest signature has %d bytes, want %d", len(sig), ed25519.SignatureSize)
	}
	if !ed25519.Verify(pub, manifestBytes, sig) {
		return nil, ErrBadSignature
	}
	return Parse(manifestBytes)
}

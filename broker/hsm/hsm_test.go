//go:build cgo

package hsm_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/dataembassy/embassy/broker/hsm"
	"github.com/dataembassy/embassy/broker/hsm/hsmtest"
	"github.com/dataembassy/embassy/broker/seal"
)

func TestSealOpen(t *testing.T) {
	cfg := hsmtest.Token(t, "broker-test", "master")
	if err := hsm.GenerateKey(cfg); err != nil {
		t.Fatal(err)
	}
	if err := hsm.GenerateKey(cfg); !errors.Is(err, hsm.ErrKeyExists) {
		t.Fatalf("second GenerateKey: %v, want ErrKeyExists", err)
	}
	s, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	file, _ := seal.NewFileKey(make([]byte, 32))

	plain, aad := []byte("a share of disk-1"), []byte("appliance/disk-1")
	sealed, err := s.Seal(plain, aad)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(sealed, seal.Header(seal.PKCS11)) || len(sealed) != seal.HeaderSize+seal.NonceSize+len(plain)+seal.TagSize {
		t.Fatalf("sealed record %x", sealed)
	}
	again, _ := s.Seal(plain, aad)
	if bytes.Equal(again, sealed) {
		t.Fatal("two seals are equal: nonce reused")
	}
	fileSealed, _ := file.Seal(plain, aad)
	altered := append([]byte(nil), sealed...)
	altered[len(altered)-1] ^= 1

	tests := []struct {
		name    string
		open    func() ([]byte, error)
		want    error // nil: opens to plain
		backend *seal.WrongBackendError
	}{
		{"round trip", func() ([]byte, error) { return s.Open(sealed, aad) }, nil, nil},
		{"other aad", func() ([]byte, error) { return s.Open(sealed, []byte("appliance/disk-2")) }, seal.ErrNotAuthentic, nil},
		{"altered", func() ([]byte, error) { return s.Open(altered, aad) }, seal.ErrNotAuthentic, nil},
		{"sealed under the file key", func() ([]byte, error) { return s.Open(fileSealed, aad) }, nil,
			&seal.WrongBackendError{Sealed: seal.File, Opener: seal.PKCS11}},
		{"opened with the file key", func() ([]byte, error) { return file.Open(sealed, aad) }, nil,
			&seal.WrongBackendError{Sealed: seal.PKCS11, Opener: seal.File}},
		{"truncated", func() ([]byte, error) { return s.Open(sealed[:seal.HeaderSize+seal.NonceSize+3], aad) }, seal.ErrMalformed, nil},
		// The pool reuses sessions after a failed operation was closed.
		{"round trip after failures", func() ([]byte, error) { return s.Open(again, aad) }, nil, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.open()
			var wb *seal.WrongBackendError
			switch {
			case tc.backend != nil:
				if !errors.As(err, &wb) || *wb != *tc.backend {
					t.Fatalf("got %v, want %v", err, tc.backend)
				}
			case tc.want != nil:
				if !errors.Is(err, tc.want) {
					t.Fatalf("got %v, want %v", err, tc.want)
				}
			case err != nil || !bytes.Equal(got, plain):
				t.Fatalf("got %q, %v", got, err)
			}
		})
	}
}

func TestOpenRefuses(t *testing.T) {
	cfg := hsmtest.Token(t, "broker-test", "master")
	if err := hsm.GenerateKey(cfg); err != nil {
		t.Fatal(err)
	}
	with := func(f func(*hsm.Config)) hsm.Config {
		c := cfg
		f(&c)
		return c
	}
	tests := []struct {
		name string
		cfg  hsm.Config
		want error // nil: any error
	}{
		{"unknown token", with(func(c *hsm.Config) { c.TokenLabel = "nobody" }), hsm.ErrTokenNotFound},
		{"unknown key", with(func(c *hsm.Config) { c.KeyLabel = "other" }), hsm.ErrKeyNotFound},
		{"wrong PIN", with(func(c *hsm.Config) { c.PIN = []byte("0000") }), nil},
		{"no module", with(func(c *hsm.Config) { c.Module = "/nonexistent/libpkcs11.so" }), nil},
		{"empty PIN", with(func(c *hsm.Config) { c.PIN = nil }), nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, err := hsm.Open(tc.cfg)
			if err == nil {
				s.Close()
				t.Fatal("opened")
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			t.Log(err)
		})
	}
	// A key whose value may leave the token is refused.
	p := rawSession(t, cfg)
	if _, err := p.ctx.GenerateKey(p.sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, "weak"),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
	}); err != nil {
		t.Fatal(err)
	}
	p.close()
	if s, err := hsm.Open(with(func(c *hsm.Config) { c.KeyLabel = "weak" })); !errors.Is(err, hsm.ErrKeyExtractable) {
		if s != nil {
			s.Close()
		}
		t.Fatalf("extractable key: %v, want ErrKeyExtractable", err)
	}
}

// TestKeyNotExtractable: the generated keys' values (the AES master key,
// an ECDSA CA key's private half) cannot be read out of the token, and the
// token says they never could.
func TestKeyNotExtractable(t *testing.T) {
	for _, kind := range []struct {
		name     string
		generate func(hsm.Config) error
		class    uint
	}{
		{"AES master key", hsm.GenerateKey, pkcs11.CKO_SECRET_KEY},
		{"ECDSA CA key", func(c hsm.Config) error { _, err := hsm.GenerateSigningKey(c); return err }, pkcs11.CKO_PRIVATE_KEY},
	} {
		t.Run(kind.name, func(t *testing.T) {
			cfg := hsmtest.Token(t, "broker-test", "master")
			if err := kind.generate(cfg); err != nil {
				t.Fatal(err)
			}
			checkNotExtractable(t, cfg, kind.class)
		})
	}
}

// checkNotExtractable reads the key of class labelled cfg.KeyLabel in a
// session of the test's own: its value is refused as sensitive and its
// attributes say it never left the token.
func checkNotExtractable(t *testing.T, cfg hsm.Config, class uint) {
	t.Helper()
	p := rawSession(t, cfg)
	defer p.close()
	if err := p.ctx.FindObjectsInit(p.sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, class), pkcs11.NewAttribute(pkcs11.CKA_LABEL, cfg.KeyLabel)}); err != nil {
		t.Fatal(err)
	}
	objs, _, err := p.ctx.FindObjects(p.sh, 2)
	p.ctx.FindObjectsFinal(p.sh)
	if err != nil || len(objs) != 1 {
		t.Fatalf("found %d keys: %v", len(objs), err)
	}
	if v, err := p.ctx.GetAttributeValue(p.sh, objs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)}); err == nil {
		t.Fatalf("CKA_VALUE read out of the token: %d bytes", len(v[0].Value))
	} else if !errors.Is(err, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_SENSITIVE)) {
		t.Fatalf("C_GetAttributeValue(CKA_VALUE): %v, want CKR_ATTRIBUTE_SENSITIVE", err)
	}
	for _, tc := range []struct {
		attr uint
		name string
		want bool
	}{
		{pkcs11.CKA_EXTRACTABLE, "CKA_EXTRACTABLE", false},
		{pkcs11.CKA_NEVER_EXTRACTABLE, "CKA_NEVER_EXTRACTABLE", true},
		{pkcs11.CKA_SENSITIVE, "CKA_SENSITIVE", true},
		{pkcs11.CKA_ALWAYS_SENSITIVE, "CKA_ALWAYS_SENSITIVE", true},
		{pkcs11.CKA_TOKEN, "CKA_TOKEN", true},
	} {
		a, err := p.ctx.GetAttributeValue(p.sh, objs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(tc.attr, nil)})
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got := len(a[0].Value) == 1 && a[0].Value[0] != 0; got != tc.want {
			t.Errorf("%s is %t, want %t", tc.name, got, tc.want)
		}
	}
}

func TestConfigCheck(t *testing.T) {
	ok := hsm.Config{Module: "/m.so", TokenLabel: "t", PIN: []byte("1"), KeyLabel: "k"}
	if err := ok.Check(); err != nil {
		t.Fatal(err)
	}
	for name, f := range map[string]func(*hsm.Config){
		"no module":        func(c *hsm.Config) { c.Module = "" },
		"no token":         func(c *hsm.Config) { c.TokenLabel = "" },
		"no PIN":           func(c *hsm.Config) { c.PIN = nil },
		"no key label":     func(c *hsm.Config) { c.KeyLabel = "" },
		"long token label": func(c *hsm.Config) { c.TokenLabel = string(make([]byte, 33)) },
		"PIN with newline": func(c *hsm.Config) { c.PIN = []byte("12\n34") },
	} {
		c := ok
		f(&c)
		if c.Check() == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// raw is a logged-in read-write session of the test's own, opened while
// no Sealer of the process uses the module.
type raw struct {
	ctx *pkcs11.Ctx
	sh  pkcs11.SessionHandle
}

func rawSession(t *testing.T, cfg hsm.Config) *raw {
	t.Helper()
	ctx := pkcs11.New(cfg.Module)
	if err := ctx.Initialize(); err != nil {
		t.Fatal(err)
	}
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range slots {
		if ti, _ := ctx.GetTokenInfo(s); ti.Label == cfg.TokenLabel {
			sh, err := ctx.OpenSession(s, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
			if err != nil {
				t.Fatal(err)
			}
			if err := ctx.Login(sh, pkcs11.CKU_USER, string(cfg.PIN)); err != nil {
				t.Fatal(err)
			}
			return &raw{ctx, sh}
		}
	}
	t.Fatalf("no token %q", cfg.TokenLabel)
	return nil
}

func (r *raw) close() {
	r.ctx.CloseSession(r.sh)
	r.ctx.Finalize()
	r.ctx.Destroy()
}

// BenchmarkSealOpen compares sealing and opening a 33-byte share (a Shamir
// share of a 32-byte key) with the file key and with the key in SoftHSM2.
func BenchmarkSealOpen(b *testing.B) {
	cfg := hsmtest.Token(b, "broker-bench", "master")
	if err := hsm.GenerateKey(cfg); err != nil {
		b.Fatal(err)
	}
	s, err := hsm.Open(cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	file, _ := seal.NewFileKey(make([]byte, 32))
	share, aad := make([]byte, 33), []byte("appliance/disk-1")
	for _, tc := range []struct {
		name string
		s    interface {
			Seal(plain, aad []byte) ([]byte, error)
			Open(sealed, aad []byte) ([]byte, error)
		}
	}{{"file", file}, {"softhsm2", s}} {
		b.Run(tc.name, func(b *testing.B) {
			for b.Loop() {
				sealed, err := tc.s.Seal(share, aad)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := tc.s.Open(sealed, aad); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

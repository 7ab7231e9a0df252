//go:build cgo

package hsm

import (
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/miekg/pkcs11"

	"github.com/dataembassy/embassy/broker/seal"
)

// module is a loaded, initialised PKCS#11 module shared by every Sealer of
// the process that uses it (C_Initialize is once per process).
type module struct {
	ctx  *pkcs11.Ctx
	refs int
}

var (
	modulesMu sync.Mutex
	modules   = map[string]*module{}
)

func loadModule(path string) (*pkcs11.Ctx, error) {
	modulesMu.Lock()
	defer modulesMu.Unlock()
	if m := modules[path]; m != nil {
		m.refs++
		return m.ctx, nil
	}
	ctx := pkcs11.New(path)
	if ctx == nil {
		return nil, fmt.Errorf("load PKCS#11 module %s: not found or not a PKCS#11 library", path)
	}
	if err := ctx.Initialize(); err != nil && !isCode(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		ctx.Destroy()
		return nil, fmt.Errorf("initialise PKCS#11 module %s: %w", path, err)
	}
	modules[path] = &module{ctx: ctx, refs: 1}
	return ctx, nil
}

func releaseModule(path string) {
	modulesMu.Lock()
	defer modulesMu.Unlock()
	m := modules[path]
	if m == nil {
		return
	}
	if m.refs--; m.refs == 0 {
		m.ctx.Finalize()
		m.ctx.Destroy()
		delete(modules, path)
	}
}

func isCode(err error, code uint) bool {
	var e pkcs11.Error
	return errors.As(err, &e) && uint(e) == code
}

// token is a logged-in PKCS#11 token with a small pool of sessions; a
// Sealer and a Signer each hold one.
type token struct {
	module string
	ctx    *pkcs11.Ctx
	slot   uint
	login  pkcs11.SessionHandle // kept open: the login lasts while it does
	idle   chan pkcs11.SessionHandle

	closeOnce sync.Once
}

// Sealer seals shares with the token's key. It is safe for concurrent use:
// each operation takes a session from a small pool.
type Sealer struct {
	*token
	key pkcs11.ObjectHandle
}

// maxIdle is how many sessions the pool keeps open between operations.
const maxIdle = 16

// session opens the token named by cfg, logs in as user, and returns the
// module, slot and logged-in session. rw asks for a read-write session.
func session(cfg Config, rw bool) (*pkcs11.Ctx, uint, pkcs11.SessionHandle, error) {
	if err := cfg.Check(); err != nil {
		return nil, 0, 0, err
	}
	ctx, err := loadModule(cfg.Module)
	if err != nil {
		return nil, 0, 0, err
	}
	fail := func(err error) (*pkcs11.Ctx, uint, pkcs11.SessionHandle, error) {
		releaseModule(cfg.Module)
		return nil, 0, 0, err
	}
	slot, err := findToken(ctx, cfg.TokenLabel)
	if err != nil {
		return fail(err)
	}
	flags := uint(pkcs11.CKF_SERIAL_SESSION)
	if rw {
		flags |= pkcs11.CKF_RW_SESSION
	}
	sh, err := ctx.OpenSession(slot, flags)
	if err != nil {
		return fail(fmt.Errorf("open PKCS#11 session on token %q: %w", cfg.TokenLabel, err))
	}
	// The PIN is handed over as a string: miekg/pkcs11 takes no []byte.
	if err := ctx.Login(sh, pkcs11.CKU_USER, string(cfg.PIN)); err != nil && !isCode(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
		ctx.CloseSession(sh)
		return fail(fmt.Errorf("log in to PKCS#11 token %q: %w", cfg.TokenLabel, err))
	}
	return ctx, slot, sh, nil
}

func findToken(ctx *pkcs11.Ctx, label string) (uint, error) {
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		return 0, fmt.Errorf("list PKCS#11 slots: %w", err)
	}
	for _, s := range slots {
		ti, err := ctx.GetTokenInfo(s)
		if err != nil {
			continue
		}
		if strings.TrimRight(ti.Label, " \x00") == label {
			return s, nil
		}
	}
	return 0, fmt.Errorf("%w: %q", ErrTokenNotFound, label)
}

// findKeys returns the AES secret keys labelled label.
func findKeys(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle, label string) ([]pkcs11.ObjectHandle, error) {
	return findObjects(ctx, sh, pkcs11.CKO_SECRET_KEY, pkcs11.CKK_AES, label)
}

// findObjects returns the objects of class with key type keyType labelled
// label (at most two: enough to tell one from several).
func findObjects(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle, class, keyType uint, label string) ([]pkcs11.ObjectHandle, error) {
	tmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, keyType),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}
	if err := ctx.FindObjectsInit(sh, tmpl); err != nil {
		return nil, fmt.Errorf("find key %q: %w", label, err)
	}
	objs, _, err := ctx.FindObjects(sh, 2)
	if ferr := ctx.FindObjectsFinal(sh); err == nil && ferr != nil {
		err = ferr
	}
	if err != nil {
		return nil, fmt.Errorf("find key %q: %w", label, err)
	}
	return objs, nil
}

// GenerateKey generates the master key in the token: AES-256, on the
// token, private, sensitive, not extractable, for encryption and
// decryption only. It refuses a label the token already holds.
func GenerateKey(cfg Config) error {
	ctx, _, sh, err := session(cfg, true)
	if err != nil {
		return err
	}
	defer releaseModule(cfg.Module)
	defer ctx.CloseSession(sh)
	objs, err := findKeys(ctx, sh, cfg.KeyLabel)
	if err != nil {
		return err
	}
	if len(objs) > 0 {
		return fmt.Errorf("%w: %q", ErrKeyExists, cfg.KeyLabel)
	}
	tmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, cfg.KeyLabel),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
	}
	if _, err := ctx.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, tmpl); err != nil {
		return fmt.Errorf("generate AES-256 key %q in token %q: %w", cfg.KeyLabel, cfg.TokenLabel, err)
	}
	return nil
}

// Open finds the key labelled cfg.KeyLabel in the token and returns a
// Sealer using it. The key must be AES-256, sensitive and not extractable.
// Close releases the token.
func Open(cfg Config) (*Sealer, error) {
	tok, err := openToken(cfg)
	if err != nil {
		return nil, err
	}
	s := &Sealer{token: tok}
	objs, err := findKeys(tok.ctx, tok.login, cfg.KeyLabel)
	switch {
	case err != nil:
	case len(objs) == 0:
		err = fmt.Errorf("%w: %q in token %q", ErrKeyNotFound, cfg.KeyLabel, cfg.TokenLabel)
	case len(objs) > 1:
		err = fmt.Errorf("%w: %q", ErrAmbiguousKey, cfg.KeyLabel)
	default:
		s.key = objs[0]
		err = s.checkKey()
	}
	if err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// checkKey refuses a key whose value could leave the token.
func (s *Sealer) checkKey() error {
	attrs, err := s.ctx.GetAttributeValue(s.login, s.key, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, nil),
	})
	if err != nil {
		return fmt.Errorf("read the key's attributes: %w", err)
	}
	sensitive, extractable, length := attrBool(attrs[0]), attrBool(attrs[1]), attrUint(attrs[2])
	if !sensitive || extractable || length != 32 {
		return fmt.Errorf("%w (sensitive %t, extractable %t, %d bytes)", ErrKeyExtractable, sensitive, extractable, length)
	}
	return nil
}

func attrBool(a *pkcs11.Attribute) bool { return len(a.Value) == 1 && a.Value[0] != 0 }

func attrUint(a *pkcs11.Attribute) uint64 {
	var v uint64
	for i := len(a.Value) - 1; i >= 0; i-- { // CK_ULONG, native (little) endian
		v = v<<8 | uint64(a.Value[i])
	}
	return v
}

// openToken opens the token named by cfg with a read-only logged-in
// session and an empty pool.
func openToken(cfg Config) (*token, error) {
	ctx, slot, sh, err := session(cfg, false)
	if err != nil {
		return nil, err
	}
	return &token{module: cfg.Module, ctx: ctx, slot: slot, login: sh, idle: make(chan pkcs11.SessionHandle, maxIdle)}, nil
}

// Close closes the sessions (ending the login once no other Sealer or
// Signer of the process holds one on the token) and releases the module.
func (s *token) Close() error {
	s.closeOnce.Do(func() {
		for {
			select {
			case sh := <-s.idle:
				s.ctx.CloseSession(sh)
				continue
			default:
			}
			break
		}
		s.ctx.CloseSession(s.login)
		releaseModule(s.module)
	})
	return nil
}

// do runs op on a pooled session. A session whose operation failed is
// closed rather than reused (its operation state is undefined).
func (s *token) do(op func(pkcs11.SessionHandle) ([]byte, error)) ([]byte, error) {
	var sh pkcs11.SessionHandle
	select {
	case sh = <-s.idle:
	default:
		var err error
		if sh, err = s.ctx.OpenSession(s.slot, pkcs11.CKF_SERIAL_SESSION); err != nil {
			return nil, fmt.Errorf("open PKCS#11 session: %w", err)
		}
	}
	out, err := op(sh)
	if err != nil {
		s.ctx.CloseSession(sh)
		return nil, err
	}
	select {
	case s.idle <- sh:
	default:
		s.ctx.CloseSession(sh)
	}
	return out, nil
}

// Seal encrypts plain inside the token, authenticating the header and aad.
func (s *Sealer) Seal(plain, aad []byte) ([]byte, error) {
	nonce, err := seal.Nonce()
	if err != nil {
		return nil, err
	}
	h := seal.Header(seal.PKCS11)
	ct, err := s.do(func(sh pkcs11.SessionHandle) ([]byte, error) {
		params := pkcs11.NewGCMParams(nonce, seal.AAD(h, aad), seal.TagSize*8)
		defer params.Free()
		if err := s.ctx.EncryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, s.key); err != nil {
			return nil, fmt.Errorf("PKCS#11 AES-GCM encrypt: %w", err)
		}
		ct, err := s.ctx.Encrypt(sh, plain)
		if err != nil {
			return nil, fmt.Errorf("PKCS#11 AES-GCM encrypt: %w", err)
		}
		return ct, nil
	})
	if err != nil {
		return nil, err
	}
	if len(ct) != len(plain)+seal.TagSize {
		return nil, fmt.Errorf("PKCS#11 AES-GCM encrypt returned %d bytes for %d", len(ct), len(plain))
	}
	return append(append(h, nonce...), ct...), nil
}

// Open decrypts a record sealed by Seal with the same token key and aad.
// A record sealed under the file key is a *seal.WrongBackendError, one that
// does not authenticate seal.ErrNotAuthentic.
func (s *Sealer) Open(sealed, aad []byte) ([]byte, error) {
	h, nonce, body, err := seal.Split(sealed, seal.PKCS11)
	if err != nil {
		return nil, err
	}
	return s.do(func(sh pkcs11.SessionHandle) ([]byte, error) {
		params := pkcs11.NewGCMParams(nonce, seal.AAD(h, aad), seal.TagSize*8)
		defer params.Free()
		if err := s.ctx.DecryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, s.key); err != nil {
			return nil, fmt.Errorf("PKCS#11 AES-GCM decrypt: %w", err)
		}
		out, err := s.ctx.Decrypt(sh, body)
		switch {
		case isCode(err, pkcs11.CKR_ENCRYPTED_DATA_INVALID) || isCode(err, pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE):
			return nil, seal.ErrNotAuthentic
		case isCode(err, pkcs11.CKR_GENERAL_ERROR):
			// SoftHSM2 reports a GCM tag mismatch as a general error.
			return nil, fmt.Errorf("%w (token: %v)", seal.ErrNotAuthentic, err)
		}
		if err != nil {
			return nil, fmt.Errorf("PKCS#11 AES-GCM decrypt: %w", err)
		}
		return out, nil
	})
}

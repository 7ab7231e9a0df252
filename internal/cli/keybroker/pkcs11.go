package keybroker

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/spf13/pflag"

	"github.com/dataembassy/embassy/broker/hsm"
	"github.com/dataembassy/embassy/internal/cli"
)

// MasterKeyPKCS11File is the file in a broker's state folder that, instead
// of MasterKeyFile, marks it as initialised with its master key in a
// PKCS#11 token: it names the token and the key (never the PIN).
const MasterKeyPKCS11File = "master.pkcs11"

// MsgFileMasterKey is serve's start-up warning when the master key is a
// file in the state folder.
const MsgFileMasterKey = "master key in a file; use --pkcs11-module for an HSM"

// pkcs11Options are the --pkcs11-* flags of init and serve.
type pkcs11Options struct {
	module, tokenLabel, pinFile, keyLabel string
}

func (p *pkcs11Options) addFlags(f *pflag.FlagSet, verb string) {
	f.StringVar(&p.module, "pkcs11-module", "", "PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so): "+verb+" the master key and the CA keys in a token instead of files")
	f.StringVar(&p.tokenLabel, "pkcs11-token-label", "", "label of the PKCS#11 token holding the master key and the CA keys")
	f.StringVar(&p.pinFile, "pkcs11-pin-file", "", "file holding the token's user PIN (mode 0600; one line)")
	f.StringVar(&p.keyLabel, "pkcs11-key-label", "", "label of the master key object in the token (the CA keys: LABEL"+ServiceCAKeySuffix+", LABEL"+RootCAKeySuffix+")")
}

// enabled reports whether the master key is in a token.
func (p pkcs11Options) enabled() bool { return p.module != "" }

// check validates the flags as a set.
func (p pkcs11Options) check() error {
	if !p.enabled() {
		var set []string
		for flag, v := range map[string]string{"--pkcs11-token-label": p.tokenLabel, "--pkcs11-pin-file": p.pinFile, "--pkcs11-key-label": p.keyLabel} {
			if v != "" {
				set = append(set, flag)
			}
		}
		if len(set) > 0 {
			return cli.Next(fmt.Errorf("%s given without --pkcs11-module", strings.Join(slices.Sorted(slices.Values(set)), ", ")),
				"pass --pkcs11-module with the token's PKCS#11 library, or drop the --pkcs11-* flags to use a master key file")
		}
		return nil
	}
	var missing []string
	for _, f := range []struct{ flag, v string }{{"--pkcs11-token-label", p.tokenLabel}, {"--pkcs11-pin-file", p.pinFile}, {"--pkcs11-key-label", p.keyLabel}} {
		if f.v == "" {
			missing = append(missing, f.flag)
		}
	}
	if len(missing) > 0 {
		return cli.Next(fmt.Errorf("--pkcs11-module needs %s", strings.Join(missing, ", ")),
			"name the token, the PIN file and the key: --pkcs11-token-label L --pkcs11-pin-file F --pkcs11-key-label K")
	}
	if _, err := os.Stat(p.module); err != nil {
		return cli.Next(fmt.Errorf("PKCS#11 module: %w", err), "install the token's library (SoftHSM2: apt-get install softhsm2)")
	}
	return nil
}

// config checks the flags and reads the PIN; the caller clears cfg.PIN.
func (p pkcs11Options) config() (hsm.Config, error) {
	if err := p.check(); err != nil {
		return hsm.Config{}, err
	}
	st, err := os.Stat(p.pinFile)
	if err != nil {
		return hsm.Config{}, fmt.Errorf("PKCS#11 PIN file: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return hsm.Config{}, cli.Next(fmt.Errorf("PKCS#11 PIN file %s is readable by others (mode %v)", p.pinFile, st.Mode().Perm()),
			"chmod 600 %s", p.pinFile)
	}
	raw, err := os.ReadFile(p.pinFile)
	if err != nil {
		return hsm.Config{}, fmt.Errorf("PKCS#11 PIN file: %w", err)
	}
	pin := bytes.TrimRight(raw, "\r\n")
	cfg := hsm.Config{Module: p.module, TokenLabel: p.tokenLabel, PIN: append([]byte(nil), pin...), KeyLabel: p.keyLabel}
	clear(raw)
	if err := cfg.Check(); err != nil {
		clear(cfg.PIN)
		return hsm.Config{}, fmt.Errorf("%s: %w", p.pinFile, err)
	}
	return cfg, nil
}

// pkcs11Record is the content of MasterKeyPKCS11File.
type pkcs11Record struct {
	Module     string `json:"module"`
	TokenLabel string `json:"token_label"`
	KeyLabel   string `json:"key_label"`
	// The CA keys in the same token (labels of ECDSA P-256 key pairs):
	// the root's when init created it there, and the service CA's. A
	// folder made before CA keys went into the token has neither, and its
	// service CA key is ServiceCAKeyFile.
	RootCAKeyLabel    string `json:"root_ca_key_label,omitempty"`
	ServiceCAKeyLabel string `json:"service_ca_key_label,omitempty"`
}

// The labels of the CA keys init generates in the token: the master key's
// label with these suffixes.
const (
	RootCAKeySuffix    = "-root-ca"
	ServiceCAKeySuffix = "-service-ca"
)

// tokenCAKeys are the CA keys an init generates in the token: open while
// init issues certificates with them, destroyed again if init fails.
type tokenCAKeys struct {
	cfg                     hsm.Config // KeyLabel unused; the PIN is the caller's
	rootLabel, serviceLabel string     // set once generated
	signers                 []*hsm.Signer
}

// generate makes an ECDSA P-256 key pair labelled label in the token,
// records the label in *field, and opens it.
func (k *tokenCAKeys) generate(field *string, label string) (*hsm.Signer, error) {
	cfg := k.cfg
	cfg.KeyLabel = label
	if _, err := hsm.GenerateSigningKey(cfg); err != nil {
		return nil, err
	}
	*field = label
	s, err := hsm.OpenSigner(cfg)
	if err != nil {
		return nil, err
	}
	k.signers = append(k.signers, s)
	return s, nil
}

// close releases the token (the keys stay in it).
func (k *tokenCAKeys) close() {
	if k == nil {
		return
	}
	for _, s := range k.signers {
		s.Close()
	}
	k.signers = nil
}

// rollback destroys the keys this init generated.
func (k *tokenCAKeys) rollback() {
	if k == nil {
		return
	}
	for _, label := range []string{k.rootLabel, k.serviceLabel} {
		if label == "" {
			continue
		}
		cfg := k.cfg
		cfg.KeyLabel = label
		hsm.DestroySigningKey(cfg) // best effort: init already failed
	}
}

// describe says where the CA keys are, for init's output.
func (k *tokenCAKeys) describe() string {
	s := fmt.Sprintf("service CA key %q generated in the token (ECDSA P-256, not extractable; no %s)", k.serviceLabel, ServiceCAKeyFile)
	if k.rootLabel != "" {
		s += fmt.Sprintf("; root CA key %q generated in the token (no %s)", k.rootLabel, BrokerCAKeyFile)
	}
	return s
}

func writePKCS11Record(dir string, p pkcs11Options, rootLabel, serviceLabel string) error {
	b, _ := json.MarshalIndent(pkcs11Record{Module: p.module, TokenLabel: p.tokenLabel, KeyLabel: p.keyLabel,
		RootCAKeyLabel: rootLabel, ServiceCAKeyLabel: serviceLabel}, "", "  ")
	return os.WriteFile(filepath.Join(dir, MasterKeyPKCS11File), append(b, '\n'), 0o600)
}

// readPKCS11Record returns the folder's record, or nil when its master key
// is not in a token.
func readPKCS11Record(dir string) (*pkcs11Record, error) {
	b, err := os.ReadFile(filepath.Join(dir, MasterKeyPKCS11File))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var r pkcs11Record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%s: %w", MasterKeyPKCS11File, err)
	}
	return &r, nil
}

// matches refuses serve flags naming another token or key than init used.
func (r *pkcs11Record) matches(p pkcs11Options) error {
	if r.TokenLabel != p.tokenLabel || r.KeyLabel != p.keyLabel {
		return cli.Next(fmt.Errorf("this broker's master key is key %q in token %q, not key %q in token %q",
			r.KeyLabel, r.TokenLabel, p.keyLabel, p.tokenLabel),
			"pass --pkcs11-token-label %s --pkcs11-key-label %s", r.TokenLabel, r.KeyLabel)
	}
	return nil
}

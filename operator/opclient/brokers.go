package opclient

import (
	"bytes"
	"crypto/ed25519"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
)

// Broker is one entry of the broker list: the broker's name and operator
// endpoint, the CA bundle that verifies its TLS certificate, this
// custodian's client certificate and key for it (issued by that broker's
// custodian CA; `keybroker custodian add`), and its pinned audit signing
// public key (ed25519, 32 bytes; base64 in the JSON list), which
// VerifyHeads checks the broker's signed audit heads with.
//
// CA, Cert and Key are file paths; relative ones are relative to the list's
// folder. An entry without Cert and Key (a list from before custodians)
// uses the credential the caller falls back to.
type Broker struct {
	Name     string `json:"name"`
	URL      string `json:"url"`
	CA       string `json:"ca,omitempty"`
	Cert     string `json:"cert,omitempty"`
	Key      string `json:"key,omitempty"`
	AuditKey []byte `json:"audit_key,omitempty"`
}

// MaxListBytes bounds the broker list file.
const MaxListBytes = 1 << 20

// ErrBrokerList is wrapped by every error about the broker list's content.
var ErrBrokerList = errors.New("bad broker list")

// ListError is what is wrong with a broker list: the file, the entry (""
// for the file as a whole) and the problem. It wraps ErrBrokerList and,
// for a missing file, fs.ErrNotExist.
type ListError struct {
	Path   string
	Broker string
	Err    error
}

func (e *ListError) Error() string {
	if e.Broker == "" {
		return fmt.Sprintf("%s: %v: %v", e.Path, ErrBrokerList, e.Err)
	}
	return fmt.Sprintf("%s: %v: broker %q: %v", e.Path, ErrBrokerList, e.Broker, e.Err)
}

func (e *ListError) Unwrap() []error { return []error{ErrBrokerList, e.Err} }

// LoadBrokers reads and checks a JSON broker list: at most MaxListBytes,
// no unknown field, at least one broker, unique names, https URLs with a
// host, cert and key given together, audit keys of the right size. The
// credential paths come back absolute; that the files exist is checked
// when they are loaded (Broker.Credential).
func LoadBrokers(path string) ([]Broker, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read broker list: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, MaxListBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read broker list: %w", err)
	}
	if len(b) > MaxListBytes {
		return nil, &ListError{Path: path, Err: fmt.Errorf("larger than %d bytes", MaxListBytes)}
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var out []Broker
	if err := dec.Decode(&out); err != nil {
		return nil, &ListError{Path: path, Err: err}
	}
	if dec.More() {
		return nil, &ListError{Path: path, Err: errors.New("data after the list")}
	}
	if len(out) == 0 {
		return nil, &ListError{Path: path, Err: errors.New("lists no broker")}
	}
	seen := map[string]bool{}
	dir := filepath.Dir(path)
	for i := range out {
		br := &out[i]
		if err := br.check(); err != nil {
			return nil, &ListError{Path: path, Broker: br.Name, Err: err}
		}
		if seen[br.Name] {
			return nil, &ListError{Path: path, Broker: br.Name, Err: errors.New("listed twice")}
		}
		seen[br.Name] = true
		for _, p := range []*string{&br.CA, &br.Cert, &br.Key} {
			if *p != "" && !filepath.IsAbs(*p) {
				*p = filepath.Join(dir, *p)
			}
		}
	}
	return out, nil
}

// check checks one entry's fields (not its files).
func (b Broker) check() error {
	if b.Name == "" {
		return errors.New("no name")
	}
	u, err := url.Parse(b.URL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return fmt.Errorf("url %q is not https://HOST:PORT", b.URL)
	}
	if (b.Cert == "") != (b.Key == "") {
		return errors.New("cert and key go together: give both or neither")
	}
	if len(b.AuditKey) != 0 && len(b.AuditKey) != ed25519.PublicKeySize {
		return fmt.Errorf("audit_key is %d bytes, want an ed25519 public key (%d)", len(b.AuditKey), ed25519.PublicKeySize)
	}
	return nil
}

// Check checks an entry before it is added to a list: its fields, and
// that the files it names exist and load.
func (b Broker) Check() error {
	if err := b.check(); err != nil {
		return err
	}
	_, err := b.Credential(Credential{Roots: x509.NewCertPool()})
	return err
}

// HasCert reports whether the entry names its own client certificate.
func (b Broker) HasCert() bool { return b.Cert != "" }

// Credential loads the entry's credential: its client certificate and key
// and its CA bundle; what the entry does not name comes from fallback.
func (b Broker) Credential(fallback Credential) (Credential, error) {
	cr := fallback
	if b.Cert != "" {
		cert, err := tls.LoadX509KeyPair(b.Cert, b.Key)
		if err != nil {
			return Credential{}, fmt.Errorf("broker %s: client certificate %s / key %s: %w", b.Name, b.Cert, b.Key, err)
		}
		cr.Cert = cert
	}
	if b.CA != "" {
		pem, err := os.ReadFile(b.CA)
		if err != nil {
			return Credential{}, fmt.Errorf("broker %s: CA bundle: %w", b.Name, err)
		}
		cr.Roots = x509.NewCertPool()
		if !cr.Roots.AppendCertsFromPEM(pem) {
			return Credential{}, fmt.Errorf("broker %s: CA bundle %s holds no certificate", b.Name, b.CA)
		}
	}
	return cr, nil
}

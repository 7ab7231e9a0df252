// Package config is the appliance's image configuration: the key brokers it
// attests to, the k-of-n threshold and where the trusted CA bundles live. It
// is baked into the initramfs by mkimage and so is covered by the image's
// measurement; embassy-init reads it at boot.
package config

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"time"

	"github.com/dataembassy/embassy/appliance/objref"
)

// Paths inside the image.
const (
	Path         = "/etc/embassy/config.json"
	BrokerCADir  = "/etc/embassy/broker-ca"
	ClientCAPath = "/etc/embassy/client-ca.pem"
	ImageInfo    = "/etc/embassy/image.json"
	// ImagePubKey is the image-signing public key: a pushed upgrade's
	// manifest must verify with it.
	ImagePubKey = "/etc/embassy/image-signing.pub"
	ModulesLoad = "/etc/embassy/modules.load"
)

// BrokerCAPath is where the image keeps broker name's own CA: the only CA
// the appliance believes for that broker (its TLS server and the
// certificates it issues). No broker's CA vouches for another broker.
func BrokerCAPath(name string) string { return BrokerCADir + "/" + name + ".pem" }

// CheckBrokerCAs checks that cas holds exactly one CA bundle for each of
// the config's brokers, and that each parses.
func (c *Config) CheckBrokerCAs(cas map[string][]byte) error {
	for _, b := range c.Brokers {
		pem, ok := cas[b.Name]
		if !ok {
			return fmt.Errorf("broker %s has no CA: each broker's own CA is pinned in the image", b.Name)
		}
		if _, err := ParseCertBundle(pem); err != nil {
			return fmt.Errorf("broker %s CA: %w", b.Name, err)
		}
	}
	if len(cas) != len(c.Brokers) {
		for name := range cas {
			if !slices.ContainsFunc(c.Brokers, func(b Broker) bool { return b.Name == name }) {
				return fmt.Errorf("CA given for %q, which is not a broker of the config", name)
			}
		}
	}
	return nil
}

// MaxSize bounds the config file.
const MaxSize = 1 << 20

// MaxBrokers bounds the number of key brokers (and so the share count).
const MaxBrokers = 16

// Config is the appliance configuration.
type Config struct {
	// Threshold is k: how many brokers' shares recombine a volume key.
	Threshold int `json:"threshold"`
	// Brokers are the n home-state key brokers.
	Brokers []Broker `json:"brokers"`
	// Ingest configures the restic REST service.
	Ingest Ingest `json:"ingest"`
	// TrialTimeoutSeconds bounds how long this image, booted once from
	// the trial slot after an upgrade, tries to attest before it reboots
	// into the committed image (DefaultTrialTimeout when 0; 30 to 3600).
	TrialTimeoutSeconds int `json:"trial_timeout_seconds,omitempty"`
}

// DefaultTrialTimeout is TrialTimeoutSeconds when the config gives none.
const DefaultTrialTimeout = 3 * time.Minute

// TrialTimeout is how long a trial boot of this image tries to attest.
func (c *Config) TrialTimeout() time.Duration {
	if c.TrialTimeoutSeconds == 0 {
		return DefaultTrialTimeout
	}
	return time.Duration(c.TrialTimeoutSeconds) * time.Second
}

// Ingest is the ingest service's configuration.
type Ingest struct {
	// Port the service listens on, on every NIC.
	Port int `json:"port"`
	// Addresses clients reach the appliance at (IP addresses), put in the
	// attested certificate beside the appliance's own name.
	Addresses []string `json:"addresses"`
	// Repositories maps each register's repository to its clients
	// (common names of certificates from the home-state client CA).
	Repositories map[string]Access `json:"repositories"`
}

// Access lists a repository's writers (append) and readers, and the space
// it may take.
type Access struct {
	Writers []string `json:"writers"`
	Readers []string `json:"readers"`
	// QuotaBytes bounds the bytes the repository's objects take on each
	// disk, whoever writes them (its clients or the twin's replication):
	// one repository filling the disks cannot stop the others. Required.
	QuotaBytes int64 `json:"quota_bytes"`
}

// Broker is one key broker and its candidate endpoints (one per network
// path), tried in order.
type Broker struct {
	Name      string   `json:"name"`
	Endpoints []string `json:"endpoints"`
}

var brokerName = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// Validate checks the whole config and names the first problem.
func (c *Config) Validate() error {
	n := len(c.Brokers)
	if n == 0 {
		return errors.New("config: no brokers")
	}
	if n > MaxBrokers {
		return fmt.Errorf("config: %d brokers, at most %d allowed", n, MaxBrokers)
	}
	if c.Threshold < 1 || c.Threshold > n {
		return fmt.Errorf("config: threshold %d must be between 1 and the broker count %d", c.Threshold, n)
	}
	if c.TrialTimeoutSeconds != 0 && (c.TrialTimeoutSeconds < 30 || c.TrialTimeoutSeconds > 3600) {
		return fmt.Errorf("config: trial_timeout_seconds %d out of range (30 to 3600)", c.TrialTimeoutSeconds)
	}
	if err := c.Ingest.validate(); err != nil {
		return err
	}
	seen := map[string]bool{}
	for i, b := range c.Brokers {
		if !brokerName.MatchString(b.Name) {
			return fmt.Errorf("config: broker %d: name %q must be lowercase letters, digits and dashes", i, b.Name)
		}
		if seen[b.Name] {
			return fmt.Errorf("config: broker name %q used twice", b.Name)
		}
		seen[b.Name] = true
		if len(b.Endpoints) == 0 || len(b.Endpoints) > 8 {
			return fmt.Errorf("config: broker %s: needs 1 to 8 endpoints, has %d", b.Name, len(b.Endpoints))
		}
		for _, e := range b.Endpoints {
			if err := checkEndpoint(e); err != nil {
				return fmt.Errorf("config: broker %s: %w", b.Name, err)
			}
		}
	}
	return nil
}

func (in *Ingest) validate() error {
	if in.Port < 1 || in.Port > 65535 {
		return fmt.Errorf("config: ingest port %d out of range", in.Port)
	}
	if len(in.Addresses) > 8 {
		return errors.New("config: at most 8 ingest addresses")
	}
	for _, a := range in.Addresses {
		if net.ParseIP(a) == nil {
			return fmt.Errorf("config: ingest address %q is not an IP address", a)
		}
	}
	if len(in.Repositories) == 0 {
		return errors.New("config: no ingest repository")
	}
	for name, acc := range in.Repositories {
		if err := objref.CheckRepo(name); err != nil {
			return fmt.Errorf("config: repository name %q must be lowercase letters, digits, dots, dashes: %w", name, err)
		}
		if len(acc.Writers)+len(acc.Readers) == 0 {
			return fmt.Errorf("config: repository %s has no client", name)
		}
		if acc.QuotaBytes < 1<<20 || acc.QuotaBytes > 1<<50 {
			return fmt.Errorf("config: repository %s: quota_bytes %d out of range (1 MiB to 1 PiB)", name, acc.QuotaBytes)
		}
		for _, c := range append(append([]string{}, acc.Writers...), acc.Readers...) {
			if c == "" || len(c) > 64 {
				return fmt.Errorf("config: repository %s: bad client name %q", name, c)
			}
		}
	}
	return nil
}

func checkEndpoint(e string) error {
	u, err := url.Parse(e)
	if err != nil {
		return fmt.Errorf("endpoint %q: %w", e, err)
	}
	if u.Scheme != "https" || u.User != nil || u.RawQuery != "" || u.Fragment != "" || (u.Path != "" && u.Path != "/") {
		return fmt.Errorf("endpoint %q must be https://host:port with nothing else", e)
	}
	host, port, err := net.SplitHostPort(u.Host)
	if err != nil || host == "" {
		return fmt.Errorf("endpoint %q needs a host and a port", e)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("endpoint %q: bad port %q", e, port)
	}
	return nil
}

// Parse decodes and validates a config, rejecting unknown fields.
func Parse(r io.Reader) (*Config, error) {
	b, err := io.ReadAll(io.LimitReader(r, MaxSize+1))
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	if len(b) > MaxSize {
		return nil, fmt.Errorf("config is larger than %d bytes", MaxSize)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var c Config
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("decode config: %w", err)
	}
	if dec.More() {
		return nil, errors.New("decode config: trailing data")
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// Marshal returns the canonical encoding of a valid config.
func (c *Config) Marshal() ([]byte, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// ParseCertBundle parses a PEM bundle of CA certificates; it must hold at
// least one certificate and nothing else.
func ParseCertBundle(pemData []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	rest := pemData
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("CA bundle holds a %q block; only certificates are allowed", block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("CA bundle: %w", err)
		}
		if !c.IsCA {
			return nil, fmt.Errorf("CA bundle: certificate %q is not a CA", c.Subject)
		}
		certs = append(certs, c)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, errors.New("CA bundle has trailing non-PEM data")
	}
	if len(certs) == 0 {
		return nil, errors.New("CA bundle holds no certificate")
	}
	return certs, nil
}

// ImageInfo is what the image knows about itself (written by mkimage).
type ImageInfoFile struct {
	Version       uint64 `json:"version"`
	KernelRelease string `json:"kernel_release"`
}

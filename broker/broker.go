// Package broker is the home state's key broker: it enrolls appliances
// (EK certificate chain, credential activation, operator approval), approves
// signed image manifests, verifies attestations (quote, nonce, event-log
// replay, manifest, anti-rollback) and then releases its share of each
// volume key sealed to the appliance's EK and PCRs, with a short-lived TLS
// certificate for the appliance's attested key. State lives in bbolt, shares
// are encrypted at rest under the broker master key, and every decision is
// appended to a hash-chained audit log.
//
// Files: reasons.go (refusals and their codes), enroll.go, operator.go
// (operator changes and reads), nonce.go, verify.go and release.go (an
// attestation's checks, then what it releases), firmware.go (the platform
// PCRs' reference: recorded at activation, checked at every attestation,
// approve-firmware), shares.go (deposits), custodians.go (who may use
// the operator API: this broker's own custodians),
// store.go (database and shares at rest), commit.go (audit entries and
// records made durable, grouped across concurrent commits), http.go (both
// HTTPS APIs),
// metrics.go (Prometheus metrics, served on the operator API).
package broker

import (
	"crypto/ed25519"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/broker/seal"
	"github.com/dataembassy/embassy/images/manifest"
)

// Config configures a broker.
type Config struct {
	Name string
	Dir  string // holds broker.db and audit.log
	// Sealer encrypts shares at rest (e.g. hsm.Sealer, a key in a PKCS#11
	// token). When nil, MasterKey (32 bytes) is used as a seal.FileKey.
	Sealer          ShareSealer
	MasterKey       []byte
	ManufacturerCAs *x509.CertPool
	ImageKey        ed25519.PublicKey
	ServiceCA       *pki.Issuer // issues attested appliance certificates
	NonceTTL        time.Duration
	CertTTL         time.Duration
	ReattestAfter   time.Duration
	// AuditKey signs the audit head the operator API returns (the key
	// `keybroker init` writes as audit.SigningKeyFile). Without it the
	// heads go unsigned and `embassyctl audit verify` fails the broker.
	AuditKey ed25519.PrivateKey
	// Custodians is this broker's own custodian CA (`keybroker init`
	// writes custodian-ca.pem in the state folder): CustodianTLSConfig
	// admits to the operator API only client certificates it issued, and
	// none whose SHA-256 fingerprint (hex) is in RevokedCustodians (the
	// list at start; SetRevokedCustodians replaces it while serving).
	Custodians        *x509.CertPool
	RevokedCustodians map[string]bool
	Log               *slog.Logger
	// Now is the clock (time.Now when nil); tests move it to expire nonces.
	Now func() time.Time
}

// Log messages of the broker.
const (
	MsgAudit       = "audit"
	MsgAuditFailed = "audit append failed"
	// MsgManifestIgnored: a stored approved manifest no longer verifies
	// (an older schema after an upgrade, or an edited database) and is
	// not counted as approved; approve the image again.
	MsgManifestIgnored = "approved manifest ignored: it no longer verifies"
	// MsgCustodianRefused: a client certificate that this broker's
	// custodian CA did not issue (or a revoked custodian's) was presented
	// to the operator API; the TLS handshake was refused.
	MsgCustodianRefused = "custodian credential refused"
)

// Broker is one key broker.
type Broker struct {
	cfg    Config
	db     *bolt.DB
	audit  *audit.Log
	sealer ShareSealer
	now    func() time.Time

	records applianceLocks // serialise read-modify-write of each appliance's record
	commits groupCommit    // concurrent commits share one audit fsync and one database transaction
	nonceM  sync.Mutex

	manifestMu sync.Mutex
	manifests  []*manifest.Manifest // verified, newest first; nil: reload
	nonces     *nonceCache
	peers      peerIndex

	metrics *metrics

	revokedCustodians atomic.Pointer[custodianRevocations]
}

// New opens the broker's state in cfg.Dir.
func New(cfg Config) (*Broker, error) {
	if cfg.Name == "" || cfg.ManufacturerCAs == nil || len(cfg.ImageKey) != ed25519.PublicKeySize || cfg.ServiceCA == nil {
		return nil, errors.New("broker config needs a name, manufacturer CAs, an image key and a service CA")
	}
	if cfg.AuditKey != nil && len(cfg.AuditKey) != ed25519.PrivateKeySize {
		return nil, errors.New("broker audit signing key must be an ed25519 private key")
	}
	if cfg.NonceTTL == 0 {
		cfg.NonceTTL = time.Minute
	}
	if cfg.CertTTL == 0 {
		cfg.CertTTL = time.Hour
	}
	if cfg.ReattestAfter == 0 {
		cfg.ReattestAfter = 5 * time.Minute
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	s := cfg.Sealer
	if s == nil {
		fk, err := seal.NewFileKey(cfg.MasterKey)
		if err != nil {
			return nil, err
		}
		s = fk
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("create broker state folder: %w", err)
	}
	db, err := openDB(filepath.Join(cfg.Dir, "broker.db"))
	if err != nil {
		return nil, err
	}
	head, err := auditHead(db)
	if err != nil {
		db.Close()
		return nil, err
	}
	log, err := audit.Open(filepath.Join(cfg.Dir, "audit.log"), head)
	if err != nil {
		db.Close()
		return nil, err
	}
	now := cfg.Now
	if now == nil {
		now = time.Now
	}
	b := &Broker{cfg: cfg, db: db, audit: log, sealer: s, now: now, nonces: newNonceCache()}
	if err := b.loadPeers(); err != nil {
		log.Close()
		db.Close()
		return nil, fmt.Errorf("read appliance records: %w", err)
	}
	b.metrics = newMetrics(b.outstandingNonces)
	b.SetRevokedCustodians(cfg.RevokedCustodians, nil)
	return b, nil
}

// Close closes the database and the audit log.
func (b *Broker) Close() error {
	b.audit.Close()
	return b.db.Close()
}

// Name returns the broker's name.
func (b *Broker) Name() string { return b.cfg.Name }

// record appends an audit entry for what by did and stores the new head.
func (b *Broker) record(by audit.Actor, event, appliance string, err error, detail map[string]string) {
	if err := b.commit(nil, entry(by, event, appliance, err, detail)); err != nil {
		b.cfg.Log.Error(MsgAuditFailed, "err", err)
	}
}

// applianceLocks serialises the read-modify-write of one appliance's
// record (and of its shares) while other appliances' proceed: an
// attestation holds only its own appliance's lock across sealing and
// commit, so concurrent attestations of distinct appliances share the
// audit log's fsync and the database's batched commit.
type applianceLocks struct {
	mu   sync.Mutex
	byID map[string]*applianceLock
}

type applianceLock struct {
	mu      sync.Mutex
	waiters int // holders and goroutines waiting; the entry goes at 0
}

// lock takes appliance id's lock and returns its release.
func (l *applianceLocks) lock(id string) (unlock func()) {
	l.mu.Lock()
	if l.byID == nil {
		l.byID = map[string]*applianceLock{}
	}
	al := l.byID[id]
	if al == nil {
		al = &applianceLock{}
		l.byID[id] = al
	}
	al.waiters++
	l.mu.Unlock()
	al.mu.Lock()
	return func() {
		al.mu.Unlock()
		l.mu.Lock()
		if al.waiters--; al.waiters == 0 {
			delete(l.byID, id)
		}
		l.mu.Unlock()
	}
}

// entry makes an audit entry for the outcome of what by did.
func entry(by audit.Actor, event, appliance string, err error, detail map[string]string) audit.Entry {
	e := audit.Entry{Event: event, Appliance: appliance, Actor: &by, Result: "ok", Detail: detail}
	if err != nil {
		e.Result = "fail"
		var r *Rejection
		if errors.As(err, &r) {
			e.Reason = r.Reason
			if r.Detail != "" {
				if e.Detail == nil {
					e.Detail = map[string]string{}
				}
				e.Detail["why"] = r.Detail
			}
		} else {
			e.Reason = err.Error()
		}
	}
	return e
}

func (b *Broker) load(id string) (*record, error) {
	var r record
	var found bool
	err := b.db.View(func(tx *bolt.Tx) error {
		var err error
		found, err = getJSON(tx, bucketAppliances, []byte(id), &r)
		return err
	})
	if err != nil {
		return nil, err
	}
	if !found {
		return nil, reject(http.StatusNotFound, ReasonUnknownAppliance, id)
	}
	return &r, nil
}

func (b *Broker) save(r *record) error {
	return b.db.Update(func(tx *bolt.Tx) error { return b.putRecord(tx, r) })
}

func (b *Broker) update(id string, fn func(*record) error) error {
	defer b.records.lock(id)()
	r, err := b.load(id)
	if err != nil {
		return err
	}
	if err := fn(r); err != nil {
		return err
	}
	return b.save(r)
}

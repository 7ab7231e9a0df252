// Package broker is the home state's key broker: it enrolls appliances
// (EK certificate chain, credential activation, operator approval), approves
// signed image manifests, verifies attestations (quote, nonce, event-log
// replay, manifest, anti-rollback) and then releases its share of each
// volume key sealed to the appliance's EK and PCRs, with a short-lived TLS
// certificate for the appliance's attested key. State lives in bbolt, shares
// are encrypted at rest under the broker master key, and every decision is
// appended to a hash-chained audit log. HTTP is in http.go.
package broker

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	pb "github.com/google/go-tpm-tools/proto/tpm"
	bolt "go.etcd.io/bbolt"
	"google.golang.org/protobuf/proto"

	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/images/manifest"
	"github.com/dataembassy/embassy/keys/shamir"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/protocol/identity"
	"github.com/dataembassy/embassy/tpm/eventlog"
	"github.com/dataembassy/embassy/tpm/verifier"
)

// Reasons a request is refused; each appears verbatim in the audit log.
const (
	ReasonUnknownAppliance = api.ReasonUnknownAppliance
	ReasonNotActivated     = "AK was never activated"
	ReasonNotEnrolled      = "enrollment not approved by an operator"
	ReasonRevoked          = "appliance revoked"
	ReasonNonceUnknown     = "nonce unknown or already used"
	ReasonNonceExpired     = "nonce expired"
	ReasonQuote            = "quote signature does not verify with the appliance's AK"
	ReasonPCRDigest        = "PCR values do not match the quoted digest"
	ReasonBinding          = "quote extraData does not bind this nonce and TLS key"
	ReasonClock            = "TPM clock not marked safe"
	ReasonRollback         = "TPM reset or restart count went backwards (state rollback)"
	ReasonReplay           = "event log does not replay to the quoted PCRs"
	ReasonImage            = "measured boot matches no approved image"
	ReasonFloor            = "image version below the appliance's floor"
	ReasonBadRequest       = "malformed request"
	ReasonEKCert           = "EK certificate does not chain to a trusted manufacturer"
	ReasonAK               = "AK is not a restricted TPM signing key"
	ReasonActivation       = "credential activation answer is wrong"
	ReasonManifestSig      = "manifest signature does not verify with the image-signing key"
	ReasonNoDiskApproval   = "no approved disk provisioning pending"
	ReasonDiskExists       = "a share for this disk is already deposited"
)

// Rejection is a refused request: the reason, the HTTP status and whether
// the appliance must lock down.
type Rejection struct {
	Reason   string
	Detail   string
	Status   int
	Lockdown bool
}

func (r *Rejection) Error() string {
	if r.Detail != "" {
		return r.Reason + ": " + r.Detail
	}
	return r.Reason
}

func reject(status int, reason, detail string) *Rejection {
	return &Rejection{Reason: reason, Detail: detail, Status: status}
}

// Config configures a broker.
type Config struct {
	Name            string
	Dir             string // holds broker.db and audit.log
	MasterKey       []byte // 32 bytes; encrypts shares at rest
	ManufacturerCAs *x509.CertPool
	ImageKey        ed25519.PublicKey
	ServiceCA       *pki.Issuer // issues attested appliance certificates
	NonceTTL        time.Duration
	CertTTL         time.Duration
	ReattestAfter   time.Duration
	Log             *slog.Logger
	// Now is the clock (time.Now when nil); tests move it to expire nonces.
	Now func() time.Time
}

type nonceRecord struct {
	appliance string
	expires   time.Time
}

// maxNonces bounds outstanding nonces.
const maxNonces = 100000

// Broker is one key broker.
type Broker struct {
	cfg    Config
	db     *bolt.DB
	audit  *audit.Log
	sealer *sealer
	now    func() time.Time

	mu     sync.Mutex // serialises read-modify-write of appliance records
	nonceM sync.Mutex

	manifestMu sync.Mutex
	manifests  []*manifest.Manifest // verified, newest first; nil: reload
	nonces     map[string]nonceRecord
}

// New opens the broker's state in cfg.Dir.
func New(cfg Config) (*Broker, error) {
	if cfg.Name == "" || cfg.ManufacturerCAs == nil || len(cfg.ImageKey) != ed25519.PublicKeySize || cfg.ServiceCA == nil {
		return nil, errors.New("broker config needs a name, manufacturer CAs, an image key and a service CA")
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
	s, err := newSealer(cfg.MasterKey)
	if err != nil {
		return nil, err
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
	return &Broker{cfg: cfg, db: db, audit: log, sealer: s, now: now, nonces: map[string]nonceRecord{}}, nil
}

// Close closes the database and the audit log.
func (b *Broker) Close() error {
	b.audit.Close()
	return b.db.Close()
}

// Name returns the broker's name.
func (b *Broker) Name() string { return b.cfg.Name }

// record appends an audit entry and stores the new head.
func (b *Broker) record(event, appliance string, err error, detail map[string]string) {
	if err := b.commit(nil, entry(event, appliance, err, detail)); err != nil {
		b.cfg.Log.Error("audit append failed", "err", err)
	}
}

// commit appends audit entries and, in one database transaction, stores the
// new audit head together with an updated appliance record (if any).
func (b *Broker) commit(r *record, entries ...audit.Entry) error {
	head, err := b.audit.Append(entries...)
	if err != nil {
		return err
	}
	for _, e := range entries {
		b.cfg.Log.Info("audit", "event", e.Event, "appliance", e.Appliance, "result", e.Result, "reason", e.Reason)
	}
	return b.db.Batch(func(tx *bolt.Tx) error {
		if r != nil {
			if err := putJSON(tx, bucketAppliances, []byte(r.ID), r); err != nil {
				return err
			}
		}
		return putJSON(tx, bucketMeta, keyAuditHead, head)
	})
}

// entry makes an audit entry for an outcome.
func entry(event, appliance string, err error, detail map[string]string) audit.Entry {
	e := audit.Entry{Event: event, Appliance: appliance, Result: "ok", Detail: detail}
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
	return b.db.Update(func(tx *bolt.Tx) error { return putJSON(tx, bucketAppliances, []byte(r.ID), r) })
}

// Enroll registers an appliance's EK after checking its certificate chain,
// and returns a credential-activation challenge for its AK.
func (b *Broker) Enroll(req *api.EnrollRequest) (_ *api.EnrollChallenge, err error) {
	id := api.ApplianceID(req.EKPublic)
	defer func() { b.record("enroll-request", id, err, nil) }()
	ekPub, perr := x509.ParsePKIXPublicKey(req.EKPublic)
	if perr != nil {
		return nil, reject(http.StatusBadRequest, ReasonBadRequest, "EK public key: "+perr.Error())
	}
	if _, err := verifier.VerifyEKCert(req.EKCert, ekPub, b.cfg.ManufacturerCAs, nil); err != nil {
		return nil, reject(http.StatusForbidden, ReasonEKCert, err.Error())
	}
	ak, aerr := verifier.ParseAK(req.AKPublic)
	if aerr != nil {
		return nil, reject(http.StatusForbidden, ReasonAK, aerr.Error())
	}
	secret := make([]byte, 32)
	rand.Read(secret)
	blob, enc, merr := verifier.MakeCredential(ekPub, ak, secret)
	if merr != nil {
		return nil, merr
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if old, lerr := b.load(id); lerr == nil && old.Enrolled && !old.Revoked {
		return nil, reject(http.StatusConflict, "appliance already enrolled", id)
	}
	r := &record{ID: id, EKPublic: req.EKPublic, EKCert: req.EKCert, AKPublic: req.AKPublic, Challenge: secret}
	if err := b.save(r); err != nil {
		return nil, err
	}
	return &api.EnrollChallenge{ApplianceID: id, CredentialBlob: blob, EncryptedSecret: enc}, nil
}

// Activate checks the answer to the activation challenge.
func (b *Broker) Activate(req *api.ActivateRequest) (err error) {
	defer func() { b.record("activate", req.ApplianceID, err, nil) }()
	b.mu.Lock()
	defer b.mu.Unlock()
	r, err := b.load(req.ApplianceID)
	if err != nil {
		return err
	}
	if len(r.Challenge) == 0 || subtle.ConstantTimeCompare(r.Challenge, req.Secret) != 1 {
		return reject(http.StatusForbidden, ReasonActivation, "")
	}
	r.Activated, r.Challenge = true, nil
	return b.save(r)
}

// ApproveEnrollment lets an activated appliance attest (operator action).
func (b *Broker) ApproveEnrollment(id string) (err error) {
	defer func() { b.record("enroll", id, err, nil) }()
	b.mu.Lock()
	defer b.mu.Unlock()
	r, err := b.load(id)
	if err != nil {
		return err
	}
	if !r.Activated {
		return reject(http.StatusConflict, ReasonNotActivated, "")
	}
	r.Enrolled, r.Revoked = true, false
	return b.save(r)
}

// ApproveManifest approves an image after verifying its signature.
func (b *Broker) ApproveManifest(manifestBytes, sig []byte) (_ *manifest.Manifest, err error) {
	var m *manifest.Manifest
	defer func() {
		d := map[string]string{}
		if m != nil {
			d["version"] = strconv.FormatUint(m.Version, 10)
		}
		b.record("approve-image", "", err, d)
	}()
	m, verr := manifest.Verify(manifestBytes, sig, b.cfg.ImageKey)
	if verr != nil {
		return nil, reject(http.StatusForbidden, ReasonManifestSig, verr.Error())
	}
	key := []byte(fmt.Sprintf("%020d", m.Version))
	err = b.db.Update(func(tx *bolt.Tx) error {
		var old manifestRecord
		if found, err := getJSON(tx, bucketManifests, key, &old); err != nil {
			return err
		} else if found && string(old.Manifest) != string(manifestBytes) {
			return reject(http.StatusConflict, "another manifest with this version is approved", "")
		}
		return putJSON(tx, bucketManifests, key, manifestRecord{Manifest: manifestBytes, Signature: sig, Approved: b.now().Unix()})
	})
	b.manifestMu.Lock()
	b.manifests = nil
	b.manifestMu.Unlock()
	if err != nil {
		return nil, err
	}
	return m, nil
}

// SetFloor sets the minimum image version an appliance may boot.
func (b *Broker) SetFloor(id string, version uint64) (err error) {
	defer func() { b.record("set-floor", id, err, map[string]string{"version": strconv.FormatUint(version, 10)}) }()
	return b.update(id, func(r *record) error { r.Floor = version; return nil })
}

// ApproveDisks lets an appliance deposit shares for count new disks.
func (b *Broker) ApproveDisks(id string, count int) (err error) {
	defer func() { b.record("approve-disk", id, err, map[string]string{"count": strconv.Itoa(count)}) }()
	if count < 1 || count > 64 {
		return reject(http.StatusBadRequest, ReasonBadRequest, "count must be 1 to 64")
	}
	return b.update(id, func(r *record) error { r.DiskApprovals += count; return nil })
}

// SetEndpoints records where the appliance's peers reach it (host:port,
// one per network path). Brokers hand the list to the other appliances.
func (b *Broker) SetEndpoints(id string, endpoints []string) (err error) {
	defer func() {
		b.record("set-endpoints", id, err, map[string]string{"endpoints": strings.Join(endpoints, ",")})
	}()
	if len(endpoints) > api.MaxEndpoints {
		return reject(http.StatusBadRequest, ReasonBadRequest, fmt.Sprintf("at most %d endpoints", api.MaxEndpoints))
	}
	for _, e := range endpoints {
		if cerr := api.CheckEndpoint(e); cerr != nil {
			return reject(http.StatusBadRequest, ReasonBadRequest, cerr.Error())
		}
	}
	return b.update(id, func(r *record) error { r.Endpoints = append([]string(nil), endpoints...); return nil })
}

// peersOf lists the appliances an appliance replicates with: every other
// enrolled, activated, unrevoked appliance that has endpoints.
func (b *Broker) peersOf(id string) ([]api.Peer, error) {
	var peers []api.Peer
	err := b.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketAppliances).ForEach(func(_, v []byte) error {
			var r record
			if err := jsonUnmarshal(v, &r); err != nil {
				return err
			}
			if r.ID != id && r.Enrolled && r.Activated && !r.Revoked && len(r.Endpoints) > 0 {
				peers = append(peers, api.Peer{ID: r.ID, Endpoints: r.Endpoints})
			}
			return nil
		})
	})
	return peers, err
}

// Revoke revokes an appliance: it gets nothing more and is told to lock down.
func (b *Broker) Revoke(id string) (err error) {
	defer func() { b.record("revoke", id, err, nil) }()
	return b.update(id, func(r *record) error { r.Revoked = true; return nil })
}

func (b *Broker) update(id string, fn func(*record) error) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	r, err := b.load(id)
	if err != nil {
		return err
	}
	if err := fn(r); err != nil {
		return err
	}
	return b.save(r)
}

// Nonce issues a fresh single-use nonce for an appliance.
func (b *Broker) Nonce(id string) (*api.NonceResponse, error) {
	if err := api.CheckApplianceID(id); err != nil {
		return nil, reject(http.StatusBadRequest, ReasonBadRequest, err.Error())
	}
	n := make([]byte, 32)
	rand.Read(n)
	now := b.now()
	exp := now.Add(b.cfg.NonceTTL)
	b.nonceM.Lock()
	defer b.nonceM.Unlock()
	if len(b.nonces) >= maxNonces {
		for k, v := range b.nonces {
			if now.After(v.expires) {
				delete(b.nonces, k)
			}
		}
		if len(b.nonces) >= maxNonces {
			return nil, reject(http.StatusServiceUnavailable, "too many outstanding nonces", "")
		}
	}
	b.nonces[hex.EncodeToString(n)] = nonceRecord{appliance: id, expires: exp}
	return &api.NonceResponse{Nonce: n, Expires: exp}, nil
}

// takeNonce consumes a nonce: it is gone whatever the outcome.
func (b *Broker) takeNonce(id string, n []byte) *Rejection {
	b.nonceM.Lock()
	defer b.nonceM.Unlock()
	k := hex.EncodeToString(n)
	rec, ok := b.nonces[k]
	delete(b.nonces, k)
	if !ok || rec.appliance != id {
		return reject(http.StatusForbidden, ReasonNonceUnknown, "")
	}
	if b.now().After(rec.expires) {
		return reject(http.StatusForbidden, ReasonNonceExpired, "")
	}
	return nil
}

// approvedManifests returns the approved manifests, newest first. They are
// verified once when loaded from the database and kept until the next
// approval.
func (b *Broker) approvedManifests() ([]*manifest.Manifest, error) {
	b.manifestMu.Lock()
	defer b.manifestMu.Unlock()
	if b.manifests != nil {
		return b.manifests, nil
	}
	var out []*manifest.Manifest
	err := b.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketManifests).ForEach(func(_, v []byte) error {
			var mr manifestRecord
			if err := jsonUnmarshal(v, &mr); err != nil {
				return err
			}
			// Re-verify: the database is not trusted more than the wire.
			m, err := manifest.Verify(mr.Manifest, mr.Signature, b.cfg.ImageKey)
			if err != nil {
				return fmt.Errorf("stored manifest: %w", err)
			}
			out = append(out, m)
			return nil
		})
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Version > out[j].Version })
	if err != nil {
		return nil, err
	}
	if out == nil {
		out = []*manifest.Manifest{}
	}
	b.manifests = out
	return out, nil
}

// Attest verifies an appliance's evidence and, if everything holds,
// releases its shares sealed to its EK and the quoted PCRs, and a TLS
// certificate for the key bound in the quote.
func (b *Broker) Attest(req *api.AttestRequest) (_ *api.AttestResponse, err error) {
	detail := map[string]string{}
	defer func() {
		if err != nil {
			b.record("attest", req.ApplianceID, err, detail)
		}
	}()
	if api.CheckApplianceID(req.ApplianceID) != nil || len(req.Nonce) != 32 || len(req.TLSPublic) == 0 || len(req.TLSPublic) > 4096 {
		return nil, reject(http.StatusBadRequest, ReasonBadRequest, "appliance id, nonce or TLS key")
	}
	if req.Health != nil {
		if herr := req.Health.Validate(); herr != nil {
			return nil, reject(http.StatusBadRequest, ReasonBadRequest, herr.Error())
		}
	}
	if rj := b.takeNonce(req.ApplianceID, req.Nonce); rj != nil {
		return nil, rj
	}
	r, err := b.load(req.ApplianceID)
	if err != nil {
		return nil, err
	}
	switch {
	case r.Revoked:
		return nil, &Rejection{Reason: ReasonRevoked, Status: http.StatusForbidden, Lockdown: true}
	case !r.Activated:
		return nil, reject(http.StatusForbidden, ReasonNotActivated, "")
	case !r.Enrolled:
		return nil, reject(http.StatusForbidden, ReasonNotEnrolled, "")
	}
	ak, err := verifier.ParseAK(r.AKPublic)
	if err != nil {
		return nil, err
	}
	q := &pb.Quote{Quote: req.Quote, RawSig: req.Signature, Pcrs: &pb.PCRs{Hash: pb.HashAlgo_SHA256, Pcrs: map[uint32][]byte{}}}
	for i, v := range req.PCRs {
		if i < 0 || i > 23 {
			return nil, reject(http.StatusBadRequest, ReasonBadRequest, "PCR index")
		}
		q.Pcrs.Pcrs[uint32(i)] = v
	}
	tlsHash := sha256.Sum256(req.TLSPublic)
	info, qerr := verifier.VerifyQuote(ak, q, api.ExtraData(req.Nonce, tlsHash[:]))
	switch {
	case errors.Is(qerr, verifier.ErrPCRDigest):
		return nil, reject(http.StatusForbidden, ReasonPCRDigest, qerr.Error())
	case errors.Is(qerr, verifier.ErrExtraData):
		return nil, reject(http.StatusForbidden, ReasonBinding, "")
	case qerr != nil:
		return nil, reject(http.StatusForbidden, ReasonQuote, qerr.Error())
	}
	detail["reset_count"] = strconv.FormatUint(uint64(info.ResetCount), 10)
	detail["restart_count"] = strconv.FormatUint(uint64(info.RestartCount), 10)
	if !info.Safe {
		return nil, reject(http.StatusForbidden, ReasonClock, "")
	}
	if r.SeenQuote && (info.ResetCount < r.ResetCount || (info.ResetCount == r.ResetCount && info.RestartCount < r.RestartCount)) {
		return nil, reject(http.StatusForbidden, ReasonRollback,
			fmt.Sprintf("quote has reset %d restart %d, broker saw reset %d restart %d", info.ResetCount, info.RestartCount, r.ResetCount, r.RestartCount))
	}
	events, rerr := eventlog.Replay(req.EventLog, info.PCRs)
	if rerr != nil {
		return nil, reject(http.StatusForbidden, ReasonReplay, rerr.Error())
	}
	manifests, err := b.approvedManifests()
	if err != nil {
		return nil, err
	}
	var matched *manifest.Manifest
	var problems []string
	for _, m := range manifests {
		c := eventlog.CheckBoot(events, m.Measurements)
		if c.OK() {
			matched = m
			break
		}
		problems = append(problems, fmt.Sprintf("v%d: %v", m.Version, c.Problems))
	}
	if matched == nil {
		return nil, reject(http.StatusForbidden, ReasonImage, fmt.Sprint(problems))
	}
	detail["image_version"] = strconv.FormatUint(matched.Version, 10)
	if matched.Version < r.Floor {
		return nil, reject(http.StatusForbidden, ReasonFloor, fmt.Sprintf("image %d, floor %d", matched.Version, r.Floor))
	}

	// Attested: issue the certificate and seal the shares.
	tlsPub, perr := x509.ParsePKIXPublicKey(req.TLSPublic)
	if perr != nil {
		return nil, reject(http.StatusBadRequest, ReasonBadRequest, "TLS key: "+perr.Error())
	}
	names := []string{r.ID + identity.DNSSuffix}
	if len(req.TLSAddresses) > 8 {
		return nil, reject(http.StatusBadRequest, ReasonBadRequest, "more than 8 TLS addresses")
	}
	for _, a := range req.TLSAddresses {
		if net.ParseIP(a) == nil {
			return nil, reject(http.StatusBadRequest, ReasonBadRequest, "TLS address "+strconv.Quote(a)+" is not an IP address")
		}
		names = append(names, a)
	}
	cert, err := b.cfg.ServiceCA.Leaf(r.ID, names, tlsPub, b.cfg.CertTTL)
	if err != nil {
		return nil, err
	}
	ekPub, err := x509.ParsePKIXPublicKey(r.EKPublic)
	if err != nil {
		return nil, err
	}
	resp := &api.AttestResponse{
		ImageVersion:  matched.Version,
		Certificate:   [][]byte{cert.Raw, b.cfg.ServiceCA.Cert.Raw},
		CertExpires:   cert.NotAfter,
		ReattestAfter: int(b.cfg.ReattestAfter.Seconds()),
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	r, err = b.load(req.ApplianceID)
	if err != nil {
		return nil, err
	}
	if r.Revoked {
		return nil, &Rejection{Reason: ReasonRevoked, Status: http.StatusForbidden, Lockdown: true}
	}
	for _, disk := range r.Disks {
		share, err := b.loadShare(r.ID, disk)
		if err != nil {
			return nil, err
		}
		blob, err := verifier.Seal(ekPub, share, info.PCRs)
		clear(share)
		if err != nil {
			return nil, err
		}
		enc, err := proto.Marshal(blob)
		if err != nil {
			return nil, err
		}
		resp.Shares = append(resp.Shares, api.SealedShare{DiskID: disk, Blob: enc})
	}
	resp.DiskApprovals = r.DiskApprovals
	if resp.Peers, err = b.peersOf(r.ID); err != nil {
		return nil, err
	}
	if req.Health != nil {
		h := *req.Health
		h.Reported = b.now().UTC()
		r.Health = &h
	}
	r.SeenQuote, r.ResetCount, r.RestartCount = true, info.ResetCount, info.RestartCount
	r.LastAttest, r.LastImage = b.now().Unix(), matched.Version
	entries := []audit.Entry{entry("attest", r.ID, nil, detail)}
	if len(resp.Shares) > 0 {
		disks := ""
		for i, s := range resp.Shares {
			if i > 0 {
				disks += ","
			}
			disks += s.DiskID
		}
		entries = append(entries, entry("release", r.ID, nil, map[string]string{"disks": disks, "image_version": detail["image_version"]}))
	}
	// The record (anti-rollback counters) and the audit entries are durable
	// before anything is released.
	if err := b.commit(r, entries...); err != nil {
		return nil, err
	}
	return resp, nil
}

func shareKey(id, disk string) []byte { return []byte(id + "/" + disk) }

func (b *Broker) loadShare(id, disk string) ([]byte, error) {
	var sealed []byte
	err := b.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketShares).Get(shareKey(id, disk))
		if v == nil {
			return fmt.Errorf("share for disk %s missing", disk)
		}
		sealed = append([]byte(nil), v...)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return b.sealer.open(sealed, shareKey(id, disk))
}

// Deposit stores this broker's share of a new disk's key. applianceID comes
// from the attested client certificate the request arrived with.
func (b *Broker) Deposit(applianceID string, req *api.DepositRequest) (err error) {
	defer func() { b.record("deposit", applianceID, err, map[string]string{"disk": req.DiskID}) }()
	if !validDiskID(req.DiskID) {
		return reject(http.StatusBadRequest, ReasonBadRequest, "disk id")
	}
	if _, perr := shamir.Parse(req.Share); perr != nil {
		return reject(http.StatusBadRequest, ReasonBadRequest, "share: "+perr.Error())
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	r, err := b.load(applianceID)
	if err != nil {
		return err
	}
	switch {
	case r.Revoked:
		return &Rejection{Reason: ReasonRevoked, Status: http.StatusForbidden, Lockdown: true}
	case !r.Enrolled:
		return reject(http.StatusForbidden, ReasonNotEnrolled, "")
	case r.DiskApprovals < 1:
		return reject(http.StatusForbidden, ReasonNoDiskApproval, "")
	}
	for _, d := range r.Disks {
		if d == req.DiskID {
			return reject(http.StatusConflict, ReasonDiskExists, "")
		}
	}
	sealed, err := b.sealer.seal(req.Share, shareKey(r.ID, req.DiskID))
	if err != nil {
		return err
	}
	r.DiskApprovals--
	r.Disks = append(r.Disks, req.DiskID)
	return b.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketShares).Put(shareKey(r.ID, req.DiskID), sealed); err != nil {
			return err
		}
		return putJSON(tx, bucketAppliances, []byte(r.ID), r)
	})
}

func validDiskID(s string) bool {
	if len(s) < 1 || len(s) > 64 {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// State lists appliances and approved manifests.
func (b *Broker) State() (*api.State, error) {
	st := &api.State{Broker: b.cfg.Name}
	err := b.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketAppliances).ForEach(func(_, v []byte) error {
			var r record
			if err := jsonUnmarshal(v, &r); err != nil {
				return err
			}
			fp := sha256.Sum256(r.EKPublic)
			a := api.Appliance{ID: r.ID, AKPublic: r.AKPublic, EKFingerprint: hex.EncodeToString(fp[:]), Activated: r.Activated, Enrolled: r.Enrolled,
				Revoked: r.Revoked, Floor: r.Floor, DiskApprovals: r.DiskApprovals, Disks: append([]string{}, r.Disks...),
				ResetCount: r.ResetCount, RestartCount: r.RestartCount, LastImage: r.LastImage,
				Endpoints: r.Endpoints, Health: r.Health}
			if r.LastAttest != 0 {
				a.LastAttestation = time.Unix(r.LastAttest, 0).UTC()
			}
			st.Appliances = append(st.Appliances, a)
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	ms, err := b.approvedManifests()
	if err != nil {
		return nil, err
	}
	for _, m := range ms {
		st.Manifests = append(st.Manifests, api.ApprovedManifest{Version: m.Version, Kernel: m.Kernel.Version, Measurements: m.Measurements})
	}
	return st, nil
}

// Audit returns the audit log and the head the broker recorded.
func (b *Broker) Audit() ([]audit.Entry, audit.Head, error) {
	entries, err := b.audit.Entries()
	if err != nil {
		return nil, audit.Head{}, err
	}
	head, err := auditHead(b.db)
	return entries, head, err
}

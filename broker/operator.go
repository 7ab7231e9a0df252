package broker

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/images/manifest"
	"github.com/dataembassy/embassy/protocol/api"
)

// ApproveManifest approves an image after verifying its signature.
func (b *Broker) ApproveManifest(by audit.Actor, manifestBytes, sig []byte) (_ *manifest.Manifest, err error) {
	var m *manifest.Manifest
	defer func() {
		d := map[string]string{}
		if m != nil {
			d["version"] = strconv.FormatUint(m.Version, 10)
		}
		b.record(by, "approve-image", "", err, d)
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
			return reject(http.StatusConflict, ReasonManifestConflict, "")
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

// SetFloor raises the minimum image version an appliance may boot. Floors
// only go up: a lower version is refused (ReasonFloorDown) and the floor
// stays; the current version again is accepted and changes nothing, so a
// change that reached only some brokers can be sent to all again.
func (b *Broker) SetFloor(by audit.Actor, id string, version uint64) (err error) {
	defer func() {
		b.record(by, "set-floor", id, err, map[string]string{"version": strconv.FormatUint(version, 10)})
	}()
	return b.update(id, func(r *record) error { return raiseFloor(r, version) })
}

// raiseFloor sets r's floor to version unless that would lower it.
func raiseFloor(r *record, version uint64) error {
	if version < r.Floor {
		return reject(http.StatusConflict, ReasonFloorDown, fmt.Sprintf("floor is %d, asked for %d", r.Floor, version))
	}
	r.Floor = version
	return nil
}

// ApproveDisks lets an appliance deposit shares for count new disks.
func (b *Broker) ApproveDisks(by audit.Actor, id string, count int) (err error) {
	defer func() { b.record(by, "approve-disk", id, err, map[string]string{"count": strconv.Itoa(count)}) }()
	if count < 1 || count > 64 {
		return reject(http.StatusBadRequest, ReasonBadRequest, "count must be 1 to 64")
	}
	return b.update(id, func(r *record) error {
		if r.Revoked {
			return reject(http.StatusConflict, ReasonRevoked, "a revoked appliance provisions no disk")
		}
		r.DiskApprovals += count
		return nil
	})
}

// SetEndpoints records where the appliance's peers reach it (host:port,
// one per network path). Brokers hand the list to the other appliances.
func (b *Broker) SetEndpoints(by audit.Actor, id string, endpoints []string) (err error) {
	defer func() {
		b.record(by, "set-endpoints", id, err, map[string]string{"endpoints": strings.Join(endpoints, ",")})
	}()
	if len(endpoints) > api.MaxEndpoints {
		return reject(http.StatusBadRequest, ReasonBadRequest, fmt.Sprintf("at most %d endpoints", api.MaxEndpoints))
	}
	for _, e := range endpoints {
		if cerr := api.CheckEndpoint(e); cerr != nil {
			return reject(http.StatusBadRequest, ReasonBadRequest, cerr.Error())
		}
	}
	return b.update(id, func(r *record) error {
		if r.Revoked {
			return reject(http.StatusConflict, ReasonRevoked, "a revoked appliance is nobody's peer")
		}
		r.Endpoints = append([]string(nil), endpoints...)
		return nil
	})
}

// Revoke revokes an appliance: it gets nothing more and is told to lock down.
func (b *Broker) Revoke(by audit.Actor, id string) (err error) {
	defer func() { b.record(by, "revoke", id, err, nil) }()
	return b.update(id, func(r *record) error { r.Revoked = true; return nil })
}

// DestroyShares deletes every share this broker holds for a revoked
// appliance (crypto-shredding) and returns the disk ids whose shares are
// gone; the appliance's record keeps its revocation, floor and counters but
// lists no disk, so nothing is released for it even if it were un-revoked.
// It refuses an appliance that is not revoked (ReasonNotRevoked) and
// changes nothing then. Destroying again destroys nothing and succeeds, so
// a destruction that reached only some brokers can be sent to all again.
// The audit entry (destroy-shares) names the operator and the disks.
//
// bbolt writes copy-on-write and does not zero the pages it frees, so the
// deleted records may stay in broker.db's free pages (and in any backup)
// until reused. They never held a plaintext share: every record is sealed
// under the master key, so what remains is ciphertext that only the master
// key opens. A disk key is unrecoverable once more than n-k of its n
// brokers destroyed their shares; to shred old copies too, retire the
// master key (destroy the token's key or the master.key file), which retires
// the broker with every share it holds.
func (b *Broker) DestroyShares(by audit.Actor, id string) (destroyed []string, err error) {
	defer func() {
		b.record(by, "destroy-shares", id, err, map[string]string{
			"disks": strings.Join(destroyed, ","), "count": strconv.Itoa(len(destroyed))})
	}()
	defer b.records.lock(id)()
	r, err := b.load(id)
	if err != nil {
		return nil, err
	}
	if !r.Revoked {
		return nil, reject(http.StatusConflict, ReasonNotRevoked, "revoke it first")
	}
	err = b.db.Update(func(tx *bolt.Tx) error {
		destroyed = nil
		prefix := shareKey(r.ID, "")
		c := tx.Bucket(bucketShares).Cursor()
		for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Seek(prefix) {
			destroyed = append(destroyed, string(k[len(prefix):]))
			if err := c.Delete(); err != nil {
				return err
			}
		}
		r.DestroyedDisks = append(r.DestroyedDisks, destroyed...)
		r.Disks = nil
		return b.putRecord(tx, r)
	})
	if err != nil {
		destroyed = nil
	}
	return destroyed, err
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
				Endpoints: r.Endpoints, Health: r.Health,
				FirmwareReference: r.Firmware != nil, PendingFirmware: pendingFirmware(&r)}
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

// SignedAudit is the operator API's audit answer: the durable entries, the
// head recorded in the database, and the head of those entries signed with
// the broker's audit signing key at the broker's current time (nil when the
// broker has no audit key).
func (b *Broker) SignedAudit() (*audit.Response, error) {
	entries, last, err := b.audit.Durable()
	if err != nil {
		return nil, err
	}
	head, err := auditHead(b.db)
	if err != nil {
		return nil, err
	}
	r := &audit.Response{Entries: entries, Head: head}
	if b.cfg.AuditKey != nil {
		if r.Signed, err = audit.SignHead(b.cfg.AuditKey, b.cfg.Name, last, b.now()); err != nil {
			return nil, err
		}
	}
	return r, nil
}

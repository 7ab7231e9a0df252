package broker

import (
	"crypto/rand"
	"encoding/hex"
	"net/http"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/dataembassy/embassy/protocol/api"
)

// Bounds of the outstanding nonces. The nonce endpoint is unauthenticated,
// so a flood must not stop other appliances from attesting:
//   - an id the broker has a record of (pending, enrolled or revoked: a
//     revoked one must still hear its lockdown) holds at most
//     MaxNoncesPerAppliance; a new nonce evicts that id's own oldest one,
//     never another id's;
//   - ids the broker does not know (which cannot attest anyway) share
//     MaxUnknownNonces; once those are taken, such requests are refused
//     with too_many_nonces until some expire.
//
// Outstanding nonces are thus at most MaxUnknownNonces plus
// MaxNoncesPerAppliance per appliance record, and a flood, whatever ids it
// names, evicts only nonces of the ids it names.
const (
	MaxNoncesPerAppliance = 16
	MaxUnknownNonces      = 4096
)

type nonceRecord struct {
	appliance string
	expires   time.Time
	known     bool // counted per id only, not in the unknown-id pool
}

// nonceCache holds the outstanding nonces; Broker.nonceM guards it.
type nonceCache struct {
	byNonce   map[string]nonceRecord // hex nonce → record
	byID      map[string][]string    // appliance id → its hex nonces, oldest first
	unknown   int                    // nonces issued to ids without a record
	nextSweep time.Time              // when expired nonces are next dropped
	perID     int                    // MaxNoncesPerAppliance but in benchmarks (export_test.go)
}

func newNonceCache() *nonceCache {
	return &nonceCache{byNonce: map[string]nonceRecord{}, byID: map[string][]string{}, perID: MaxNoncesPerAppliance}
}

// Nonce issues a fresh single-use nonce for an appliance.
func (b *Broker) Nonce(id string) (*api.NonceResponse, error) {
	if err := api.CheckApplianceID(id); err != nil {
		return nil, reject(http.StatusBadRequest, ReasonBadRequest, err.Error())
	}
	known, err := b.known(id)
	if err != nil {
		return nil, err
	}
	n := make([]byte, 32)
	rand.Read(n)
	now := b.now()
	rec := nonceRecord{appliance: id, expires: now.Add(b.cfg.NonceTTL), known: known}
	b.nonceM.Lock()
	defer b.nonceM.Unlock()
	if rj := b.nonces.add(hex.EncodeToString(n), rec, now, b.cfg.NonceTTL); rj != nil {
		return nil, rj
	}
	return &api.NonceResponse{Nonce: n, Expires: rec.expires}, nil
}

// add stores nonce k, first making room as the bounds above say.
func (c *nonceCache) add(k string, rec nonceRecord, now time.Time, ttl time.Duration) *Rejection {
	if !now.Before(c.nextSweep) {
		c.dropExpired(now)
		c.nextSweep = now.Add(ttl)
	}
	if own := c.byID[rec.appliance]; len(own) >= c.perID {
		c.remove(own[0])
	}
	if !rec.known {
		if c.unknown >= MaxUnknownNonces {
			return reject(http.StatusServiceUnavailable, ReasonTooManyNonces, "")
		}
		c.unknown++
	}
	c.byNonce[k] = rec
	c.byID[rec.appliance] = append(c.byID[rec.appliance], k)
	return nil
}

// remove forgets nonce k (if held).
func (c *nonceCache) remove(k string) (nonceRecord, bool) {
	rec, ok := c.byNonce[k]
	if !ok {
		return rec, false
	}
	delete(c.byNonce, k)
	if !rec.known {
		c.unknown--
	}
	own := c.byID[rec.appliance]
	for i, o := range own {
		if o == k {
			own = append(own[:i:i], own[i+1:]...)
			break
		}
	}
	if len(own) == 0 {
		delete(c.byID, rec.appliance)
	} else {
		c.byID[rec.appliance] = own
	}
	return rec, true
}

// dropExpired forgets every expired nonce.
func (c *nonceCache) dropExpired(now time.Time) {
	for k, rec := range c.byNonce {
		if now.After(rec.expires) {
			c.remove(k)
		}
	}
}

// known reports whether the broker has a record of appliance id.
func (b *Broker) known(id string) (bool, error) {
	var found bool
	err := b.db.View(func(tx *bolt.Tx) error {
		found = tx.Bucket(bucketAppliances).Get([]byte(id)) != nil
		return nil
	})
	return found, err
}

// takeNonce consumes a nonce: it is gone whatever the outcome.
func (b *Broker) takeNonce(id string, n []byte) *Rejection {
	b.nonceM.Lock()
	defer b.nonceM.Unlock()
	rec, ok := b.nonces.remove(hex.EncodeToString(n))
	if !ok || rec.appliance != id {
		return reject(http.StatusForbidden, ReasonNonceUnknown, "")
	}
	if b.now().After(rec.expires) {
		return reject(http.StatusForbidden, ReasonNonceExpired, "")
	}
	return nil
}

// outstandingNonces is the number of nonces held.
func (b *Broker) outstandingNonces() int {
	b.nonceM.Lock()
	defer b.nonceM.Unlock()
	return len(b.nonces.byNonce)
}

package broker

import (
	"crypto/rand"
	"encoding/hex"
	"net/http"
	"time"

	"github.com/dataembassy/embassy/protocol/api"
)

type nonceRecord struct {
	appliance string
	expires   time.Time
}

// maxNonces bounds outstanding nonces.
const maxNonces = 100000

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
			return nil, reject(http.StatusServiceUnavailable, ReasonTooManyNonces, "")
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

// outstandingNonces is the size of the nonce cache.
func (b *Broker) outstandingNonces() int {
	b.nonceM.Lock()
	defer b.nonceM.Unlock()
	return len(b.nonces)
}

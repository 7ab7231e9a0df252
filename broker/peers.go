package broker

import (
	"slices"
	"sort"
	"sync"

	bolt "go.etcd.io/bbolt"

	"github.com/dataembassy/embassy/protocol/api"
)

// peerIndex is the broker's in-memory list of the appliances others
// replicate with: every enrolled, activated, unrevoked appliance that has
// endpoints. It is built from the database when the broker starts and then
// follows every committed write of an appliance record (putRecord), so an
// attestation's answer does not decode every appliance's record.
type peerIndex struct {
	mu   sync.Mutex
	byID map[string][]string // appliance id → its endpoints
	list []api.Peer          // byID sorted by id; nil: to be rebuilt
}

// set records appliance id's standing as a peer: eligible with those
// endpoints, or not a peer.
func (p *peerIndex) set(id string, eligible bool, endpoints []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.byID == nil {
		p.byID = map[string][]string{}
	}
	old, had := p.byID[id]
	switch {
	case eligible && had && slices.Equal(old, endpoints):
		return
	case eligible:
		p.byID[id] = endpoints
	case !had:
		return
	default:
		delete(p.byID, id)
	}
	p.list = nil
}

// except returns every peer but id, sorted by id (nil when there is none).
func (p *peerIndex) except(id string) []api.Peer {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.list == nil {
		p.list = make([]api.Peer, 0, len(p.byID))
		for pid, eps := range p.byID {
			p.list = append(p.list, api.Peer{ID: pid, Endpoints: eps})
		}
		sort.Slice(p.list, func(i, j int) bool { return p.list[i].ID < p.list[j].ID })
	}
	var out []api.Peer
	for _, peer := range p.list {
		if peer.ID != id {
			out = append(out, api.Peer{ID: peer.ID, Endpoints: slices.Clone(peer.Endpoints)})
		}
	}
	return out
}

// isPeer says whether r is one others replicate with.
func isPeer(r *record) bool {
	return r.Enrolled && r.Activated && !r.Revoked && len(r.Endpoints) > 0
}

// putRecord writes r in tx; once tx commits, the peer index follows.
// Every write of an appliance record goes through it.
func (b *Broker) putRecord(tx *bolt.Tx, r *record) error {
	if err := putJSON(tx, bucketAppliances, []byte(r.ID), r); err != nil {
		return err
	}
	id, eligible, endpoints := r.ID, isPeer(r), slices.Clone(r.Endpoints)
	tx.OnCommit(func() { b.peers.set(id, eligible, endpoints) })
	return nil
}

// loadPeers builds the peer index from the database.
func (b *Broker) loadPeers() error {
	return b.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketAppliances).ForEach(func(_, v []byte) error {
			var r record
			if err := jsonUnmarshal(v, &r); err != nil {
				return err
			}
			b.peers.set(r.ID, isPeer(&r), slices.Clone(r.Endpoints))
			return nil
		})
	})
}

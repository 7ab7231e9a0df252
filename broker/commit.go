package broker

import (
	"fmt"
	"runtime"
	"sync"

	bolt "go.etcd.io/bbolt"

	"github.com/dataembassy/embassy/broker/audit"
)

// commit appends audit entries and stores the new audit head together with
// an updated appliance record (if any). It returns once both are durable,
// the entries first: the audit log is fsynced before the database
// transaction holding the head and the record begins, so the stored head
// never names an entry a crash could take back, and nothing an attestation
// releases leaves before its record and entries are on disk.
//
// Concurrent commits are grouped (groupCommit): one fsync of the audit log
// and one database transaction serve every commit queued when the group
// starts, and commits arriving meanwhile form the next group.
func (b *Broker) commit(r *record, entries ...audit.Entry) error {
	head, err := b.audit.Write(entries...)
	if err != nil {
		return err
	}
	b.metrics.auditAppends.Add(float64(len(entries)))
	for _, e := range entries {
		b.cfg.Log.Info(MsgAudit, "event", e.Event, "appliance", e.Appliance, "actor", e.Actor.String(), "result", e.Result, "reason", e.Reason)
	}
	return b.commits.do(b, &pendingCommit{rec: r, head: head})
}

// pendingCommit is one commit waiting for its group: an appliance record
// to store (nil: none) and the audit head after its entries, which are
// written to the log but not yet durable.
type pendingCommit struct {
	rec  *record
	head audit.Head
	err  error
	wake chan bool // true: lead the next group; false: done, err set
}

// groupCommit makes concurrent commits durable together without waiting
// for company: a commit that finds no group running leads one at once
// (after letting other runnable goroutines run) with whatever is queued,
// itself at least; commits that arrive meanwhile queue, and when the
// running group is done the first of them leads the next with the whole
// queue. Each commit returns once its group is
// durable.
type groupCommit struct {
	mu    sync.Mutex
	queue []*pendingCommit
	busy  bool // a leader is committing a group
}

func (g *groupCommit) do(b *Broker, c *pendingCommit) error {
	c.wake = make(chan bool, 1)
	g.mu.Lock()
	g.queue = append(g.queue, c)
	lead := !g.busy
	g.busy = true
	g.mu.Unlock()
	if !lead && !<-c.wake {
		return c.err
	}
	// Let whatever else is runnable run first: on a busy machine some of
	// it is attestations about to commit, which then join this group
	// (fewer fsyncs and transactions, each about 0.3 ms of CPU); with
	// nothing else runnable this returns at once.
	runtime.Gosched()
	g.mu.Lock()
	group := g.queue
	g.queue = nil
	g.mu.Unlock()

	// The hand-off and the wake-ups run even if the commit panics (an
	// HTTP handler's panic is recovered by net/http): a leader that never
	// handed off would leave every later commit waiting for ever.
	defer func() {
		if p := recover(); p != nil {
			for _, o := range group {
				o.err = fmt.Errorf("commit: %v", p)
			}
			defer panic(p)
		}
		g.mu.Lock()
		if len(g.queue) > 0 {
			g.queue[0].wake <- true
		} else {
			g.busy = false
		}
		g.mu.Unlock()
		for _, o := range group {
			if o != c {
				o.wake <- false
			}
		}
	}()
	b.commitGroup(group)
	return c.err
}

// commitGroup makes group durable and sets each commit's err: one fsync of
// the audit log up to the group's highest head, then one transaction
// storing every record and that head. If one record cannot be written,
// the transaction is rolled back and each commit is retried in a
// transaction of its own, so one bad record fails only its own commit.
func (b *Broker) commitGroup(group []*pendingCommit) {
	var head audit.Head
	for _, c := range group {
		if c.head.Seq > head.Seq {
			head = c.head
		}
	}
	if err := b.audit.Sync(head.Seq); err != nil {
		for _, c := range group {
			c.err = err
		}
		return
	}
	var recErr error
	err := b.db.Update(func(tx *bolt.Tx) error {
		for _, c := range group {
			if c.rec == nil {
				continue
			}
			if err := b.putRecord(tx, c.rec); err != nil {
				recErr = fmt.Errorf("store appliance record %s: %w", c.rec.ID, err)
				return recErr
			}
		}
		return storeHead(tx, head)
	})
	if recErr != nil && len(group) > 1 {
		for _, c := range group {
			b.commitGroup([]*pendingCommit{c})
		}
		return
	}
	for _, c := range group {
		c.err = err
	}
}

// storeHead stores the audit head unless the stored one is as far already:
// a commit that failed and was retried alone may come after a later one,
// and the stored head only moves forward.
func storeHead(tx *bolt.Tx, head audit.Head) error {
	var stored audit.Head
	if _, err := getJSON(tx, bucketMeta, keyAuditHead, &stored); err != nil {
		return err
	}
	if head.Seq <= stored.Seq {
		return nil
	}
	return putJSON(tx, bucketMeta, keyAuditHead, head)
}

package broker

import (
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/dataembassy/embassy/broker/audit"
)

// commitBroker is a broker with only what commit needs: a database and an
// audit log in a fresh folder.
func commitBroker(tb testing.TB) *Broker {
	tb.Helper()
	dir := tb.TempDir()
	db, err := openDB(filepath.Join(dir, "broker.db"))
	if err != nil {
		tb.Fatal(err)
	}
	log, err := audit.Open(filepath.Join(dir, "audit.log"), audit.Head{})
	if err != nil {
		tb.Fatal(err)
	}
	b := &Broker{cfg: Config{Log: slog.New(slog.NewTextHandler(io.Discard, nil))}, db: db, audit: log, now: time.Now}
	b.metrics = newMetrics(func() int { return 0 })
	tb.Cleanup(func() { b.Close() })
	return b
}

// commitRecords makes n appliance records of about the size of real ones.
func commitRecords(n int) []*record {
	recs := make([]*record, n)
	for i := range recs {
		ek := make([]byte, 1200)
		rand.Read(ek)
		recs[i] = &record{ID: fmt.Sprintf("appliance-%03d", i), EKPublic: ek[:300], EKCert: ek, AKPublic: ek[:350],
			Activated: true, Enrolled: true, Disks: []string{"disk-1"}}
	}
	return recs
}

func attestEntries(id string) []audit.Entry {
	by := audit.ApplianceActor(id)
	return []audit.Entry{
		entry(by, "attest", id, nil, map[string]string{"image_version": "1", "checked_pcrs": checkedPCRs}),
		entry(by, "release", id, nil, map[string]string{"disks": "disk-1"}),
	}
}

// TestGroupCommit: concurrent commits all end durable, each record as its
// last commit left it, and the stored head is the log's durable head.
func TestGroupCommit(t *testing.T) {
	b := commitBroker(t)
	recs := commitRecords(16)
	const per = 20
	var wg sync.WaitGroup
	for _, r := range recs {
		wg.Go(func() {
			for range per {
				r.LastAttest++
				if err := b.commit(r, attestEntries(r.ID)...); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	entries, durable, err := b.audit.Durable()
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 2*per*len(recs) {
		t.Fatalf("%d durable entries, want %d", len(entries), 2*per*len(recs))
	}
	stored, err := auditHead(b.db)
	if err != nil {
		t.Fatal(err)
	}
	if stored != durable {
		t.Fatalf("stored head %+v, log's durable head %+v", stored, durable)
	}
	for _, r := range recs {
		got, err := b.load(r.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got.LastAttest != per {
			t.Fatalf("%s: last attest %d, want %d", r.ID, got.LastAttest, per)
		}
	}
}

// TestGroupCommitBadRecord: a record that cannot be stored fails its own
// commit only; the others of its group are stored.
func TestGroupCommitBadRecord(t *testing.T) {
	b := commitBroker(t)
	recs := commitRecords(3)
	recs[1].ID = "" // bbolt refuses an empty key
	var group []*pendingCommit
	for _, r := range recs {
		head, err := b.audit.Write(attestEntries(r.ID)...)
		if err != nil {
			t.Fatal(err)
		}
		group = append(group, &pendingCommit{rec: r, head: head})
	}
	b.commitGroup(group)
	if group[0].err != nil || group[2].err != nil || group[1].err == nil {
		t.Fatalf("errors %v, %v, %v; want only the second", group[0].err, group[1].err, group[2].err)
	}
	for _, i := range []int{0, 2} {
		if _, err := b.load(recs[i].ID); err != nil {
			t.Fatal(err)
		}
	}
	if stored, err := auditHead(b.db); err != nil || stored != b.audit.Head() {
		t.Fatalf("stored head %+v (%v), log head %+v", stored, err, b.audit.Head())
	}
	var n int
	b.db.View(func(tx *bolt.Tx) error { n = tx.Bucket(bucketAppliances).Stats().KeyN; return nil })
	if n != 2 {
		t.Fatalf("%d records stored, want 2", n)
	}
}

// BenchmarkCommit measures the durable commit alone (an appliance record
// and an attestation's two audit entries per call) at 1, 8 and 64
// concurrent appliances: what the commit path costs without the
// verification's CPU work competing. Not part of make bench-broker.
func BenchmarkCommit(b *testing.B) {
	for _, conc := range []int{1, 8, 64} {
		b.Run(fmt.Sprintf("conc=%d", conc), func(b *testing.B) {
			br := commitBroker(b)
			recs := commitRecords(conc)
			per := (2000 + conc - 1) / conc
			var wg sync.WaitGroup
			start := time.Now()
			for _, r := range recs {
				wg.Go(func() {
					for range per {
						r.LastAttest++
						if err := br.commit(r, attestEntries(r.ID)...); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			b.ReportMetric(float64(per*conc)/time.Since(start).Seconds(), "commits/s")
		})
	}
}

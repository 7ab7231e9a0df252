// Package audit is the key broker's append-only, hash-chained audit log.
// Each entry records one enrollment, attestation (pass or fail with the
// reason), release, approval or revocation and who acted (Actor: the
// operator's certificate or the appliance), carries its sequence number and
// the hash of the previous entry, and is hashed itself; Verify detects any
// edited, dropped or reordered entry, and a truncated tail against the head
// the broker keeps separately. The broker signs its head with its own audit
// signing key (signed.go: SignedHead); operators keep the signed heads they
// verified, so that a history rewritten by whoever can edit the broker's
// files (database and log together, chain recomputed) no longer contains
// them.
package audit

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"
)

// Entry is one audit record.
type Entry struct {
	Seq       uint64    `json:"seq"`
	Time      time.Time `json:"time"`
	Event     string    `json:"event"`
	Appliance string    `json:"appliance,omitempty"`
	// Actor is who acted. It is covered by the hash like every field; a
	// pointer so that entries written before it existed hash as they did.
	Actor  *Actor            `json:"actor,omitempty"`
	Result string            `json:"result"` // "ok" or "fail"
	Reason string            `json:"reason,omitempty"`
	Detail map[string]string `json:"detail,omitempty"`
	Prev   string            `json:"prev"`
	Hash   string            `json:"hash"`
}

// Kinds of actor.
const (
	ActorOperator  = "operator"
	ActorAppliance = "appliance"
)

// Actor is the party an entry records as acting: an operator, named by
// the client certificate they authenticated with, or an appliance, named
// by its id (derived from its EK).
type Actor struct {
	Kind string `json:"kind"`
	// Subject and Fingerprint (SHA-256 of the DER certificate, hex) name
	// an operator's client certificate.
	Subject     string `json:"subject,omitempty"`
	Fingerprint string `json:"fingerprint,omitempty"`
	// ID is an appliance's id.
	ID string `json:"id,omitempty"`
}

// OperatorActor names the operator who authenticated with cert.
func OperatorActor(cert *x509.Certificate) Actor {
	sum := sha256.Sum256(cert.Raw)
	return Actor{Kind: ActorOperator, Subject: cert.Subject.String(), Fingerprint: hex.EncodeToString(sum[:])}
}

// ApplianceActor names appliance id.
func ApplianceActor(id string) Actor { return Actor{Kind: ActorAppliance, ID: id} }

// String describes the actor for people: the operator's subject and the
// start of their certificate's fingerprint, or the appliance's id.
func (a *Actor) String() string {
	switch {
	case a == nil:
		return "unrecorded"
	case a.Kind == ActorAppliance:
		return "appliance " + a.ID
	case a.Kind == ActorOperator:
		return fmt.Sprintf("operator %q (sha256 %.16s…)", a.Subject, a.Fingerprint)
	}
	return a.Kind
}

// Head is the last entry's sequence number and hash.
type Head struct {
	Seq  uint64 `json:"seq"`
	Hash string `json:"hash"`
}

// Response is the operator API's answer at api.PathAudit: the log and the
// head the broker recorded separately, so a reader can Verify the chain,
// and that head signed with the broker's audit signing key (absent when
// the broker has none), for the reader to keep.
type Response struct {
	Entries []Entry     `json:"entries"`
	Head    Head        `json:"head"`
	Signed  *SignedHead `json:"signed_head,omitempty"`
}

// genesis is the "previous hash" of the first entry.
var genesis = hex.EncodeToString(make([]byte, 32))

// ErrTampered is returned when the chain does not verify.
var ErrTampered = errors.New("audit log tampered")

// hashOf computes an entry's hash over its canonical encoding without the
// hash field.
func hashOf(e Entry) string {
	e.Hash = ""
	b, _ := json.Marshal(e)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// Log appends entries to a file. Appends are written in order under a
// lock and made durable by a group commit: concurrent appenders share one
// fsync, and each returns only once its own entries are on disk.
type Log struct {
	mu     sync.Mutex // order of entries, head, broken
	f      *os.File
	head   Head
	broken error // a failed write or sync: every later append fails
	now    func() time.Time

	syncMu sync.Mutex // one fsync at a time
	synced uint64     // entries up to this sequence number are durable
}

// Open opens (or creates) the log at path and verifies its chain. The log
// must contain the entry recorded as head (the broker keeps its last known
// head apart from the file): a log that was truncated or rewritten before
// that entry is refused. Entries after it (appended just before a crash)
// are accepted.
func Open(path string, head Head) (*Log, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open audit log: %w", err)
	}
	entries, err := Read(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	got, err := Verify(entries, nil)
	if err != nil {
		f.Close()
		return nil, err
	}
	if head.Seq > 0 && (head.Seq > got.Seq || entries[head.Seq-1].Hash != head.Hash) {
		f.Close()
		return nil, fmt.Errorf("%w: log ends at entry %d and does not contain the recorded head entry %d", ErrTampered, got.Seq, head.Seq)
	}
	return &Log{f: f, head: got, now: time.Now, synced: got.Seq}, nil
}

// Append writes entries (in one write), waits until they are durable and
// returns the head after the last of them.
func (l *Log) Append(entries ...Entry) (Head, error) {
	head, err := l.Write(entries...)
	if err != nil {
		return head, err
	}
	return head, l.Sync(head.Seq)
}

// Write appends entries (in one write) without waiting for them to be
// durable and returns the head after the last of them. They count as
// durable (Durable) only once a Sync covers them; a caller must not act
// on them before that.
func (l *Log) Write(entries ...Entry) (Head, error) {
	return l.write(entries)
}

// Sync returns once every entry up to sequence number seq is durable.
// Concurrent callers share one fsync: a caller whose entries an fsync
// running meanwhile covered does not sync again.
func (l *Log) Sync(seq uint64) error {
	l.syncMu.Lock()
	defer l.syncMu.Unlock()
	l.mu.Lock()
	broken := l.broken
	l.mu.Unlock()
	if broken != nil {
		// A failed fsync may have dropped dirty pages; a later fsync
		// that succeeds proves nothing about them.
		return broken
	}
	if l.synced >= seq {
		return nil // a concurrent appender's fsync covered these entries
	}
	l.mu.Lock()
	upTo := l.head.Seq
	l.mu.Unlock()
	if err := l.f.Sync(); err != nil {
		l.mu.Lock()
		l.broken = fmt.Errorf("sync audit log: %w", err)
		l.mu.Unlock()
		return l.broken
	}
	l.synced = upTo
	return nil
}

func (l *Log) write(entries []Entry) (Head, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.broken != nil {
		return l.head, l.broken
	}
	head := l.head
	var buf []byte
	for _, e := range entries {
		e.Seq = head.Seq + 1
		e.Time = l.now().UTC().Truncate(time.Millisecond)
		e.Prev = head.Hash
		if e.Prev == "" {
			e.Prev = genesis
		}
		e.Hash = hashOf(e)
		b, err := json.Marshal(e)
		if err != nil {
			return l.head, err
		}
		buf = append(append(buf, b...), '\n')
		head = Head{Seq: e.Seq, Hash: e.Hash}
	}
	if _, err := l.f.Write(buf); err != nil {
		// A partial line may be in the file: refuse further entries, and
		// the log will not verify until an operator looks at it.
		l.broken = fmt.Errorf("append audit entry: %w", err)
		return l.head, l.broken
	}
	l.head = head
	return head, nil
}

// Head returns the current head.
func (l *Log) Head() Head {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.head
}

// Entries reads the whole log.
func (l *Log) Entries() ([]Entry, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return Read(io.NewSectionReader(l.f, 0, 1<<62))
}

// Durable reads the log up to its last durable entry and returns those
// entries with their head: a consistent view whose head matches the last
// entry even while others append, and which a crash cannot take back.
func (l *Log) Durable() ([]Entry, Head, error) {
	l.syncMu.Lock() // the order Append takes the locks in
	defer l.syncMu.Unlock()
	l.mu.Lock()
	defer l.mu.Unlock()
	entries, err := Read(io.NewSectionReader(l.f, 0, 1<<62))
	if err != nil {
		return nil, Head{}, err
	}
	if uint64(len(entries)) > l.synced {
		entries = entries[:l.synced]
	}
	var head Head
	if n := len(entries); n > 0 {
		head = Head{Seq: entries[n-1].Seq, Hash: entries[n-1].Hash}
	}
	return entries, head, nil
}

// Close closes the file.
func (l *Log) Close() error { return l.f.Close() }

// Read parses a log, one JSON entry a line, rejecting unknown fields.
func Read(r io.Reader) ([]Entry, error) {
	var out []Entry
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for line := 1; sc.Scan(); line++ {
		if len(bytes.TrimSpace(sc.Bytes())) == 0 {
			continue
		}
		dec := json.NewDecoder(bytes.NewReader(sc.Bytes()))
		dec.DisallowUnknownFields()
		var e Entry
		if err := dec.Decode(&e); err != nil {
			return nil, fmt.Errorf("%w: line %d: %v", ErrTampered, line, err)
		}
		out = append(out, e)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read audit log: %w", err)
	}
	return out, nil
}

// Chain sets the sequence numbers, previous hashes and hashes of entries,
// in order from genesis, keeping every other field, and returns the head.
// It is for tools that rebuild a log (and for tests); a chain recomputed
// over edited entries verifies, so Verify alone proves nothing against
// whoever can write the broker's files: the signed heads operators keep
// (SignedHead) are what catch such a rewrite.
func Chain(entries []Entry) Head {
	head := Head{Hash: genesis}
	for i := range entries {
		entries[i].Seq = head.Seq + 1
		entries[i].Prev = head.Hash
		entries[i].Hash = hashOf(entries[i])
		head = Head{Seq: entries[i].Seq, Hash: entries[i].Hash}
	}
	if head.Seq == 0 {
		return Head{}
	}
	return head
}

// Verify checks the chain: sequence numbers 1, 2, 3, ... without gaps,
// each entry's prev equal to the previous entry's hash, and each hash
// recomputed. If want is given (non-zero), the log must end at that head.
// It returns the head the log ends at.
func Verify(entries []Entry, want *Head) (Head, error) {
	prev := genesis
	var head Head
	for i, e := range entries {
		if e.Seq != uint64(i+1) {
			return head, fmt.Errorf("%w: entry %d has sequence number %d (dropped or reordered)", ErrTampered, i+1, e.Seq)
		}
		if e.Prev != prev {
			return head, fmt.Errorf("%w: entry %d does not follow entry %d", ErrTampered, e.Seq, e.Seq-1)
		}
		if hashOf(e) != e.Hash {
			return head, fmt.Errorf("%w: entry %d was edited", ErrTampered, e.Seq)
		}
		prev = e.Hash
		head = Head{Seq: e.Seq, Hash: e.Hash}
	}
	if want != nil && want.Seq != 0 && head != *want {
		return head, fmt.Errorf("%w: log ends at entry %d, the broker's head is entry %d (truncated or rewritten)", ErrTampered, head.Seq, want.Seq)
	}
	return head, nil
}

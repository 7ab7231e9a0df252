package opclient

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"

	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/protocol/api"
)

// The heads file: the signed audit heads the operator verified, per broker,
// oldest first. A later check requires every one of them to still be in the
// broker's chain at its sequence number.
const (
	// HeadsVersion is the heads file's schema version.
	HeadsVersion = 1
	// MaxHeadsFileSize bounds the heads file (about 50,000 heads).
	MaxHeadsFileSize = 16 << 20
)

// ErrHeadsFile is wrapped by every error about a malformed heads file.
var ErrHeadsFile = errors.New("malformed audit heads file")

// Heads is the heads file's content.
type Heads struct {
	Version int                           `json:"version"`
	Brokers map[string][]audit.SignedHead `json:"brokers"`
}

// LoadHeads reads the heads file at path; a missing file is an empty one
// (the first check records the heads). A malformed file is an error
// wrapping ErrHeadsFile that names what is wrong.
func LoadHeads(path string) (*Heads, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return &Heads{Version: HeadsVersion, Brokers: map[string][]audit.SignedHead{}}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read audit heads file: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxHeadsFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("read audit heads file: %w", err)
	}
	if len(data) > MaxHeadsFileSize {
		return nil, fmt.Errorf("%w %s: larger than %d bytes", ErrHeadsFile, path, MaxHeadsFileSize)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var h Heads
	if err := dec.Decode(&h); err != nil {
		return nil, fmt.Errorf("%w %s: %v", ErrHeadsFile, path, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w %s: data after the JSON object", ErrHeadsFile, path)
	}
	if err := h.validate(); err != nil {
		return nil, fmt.Errorf("%w %s: %v", ErrHeadsFile, path, err)
	}
	return &h, nil
}

// validate checks the schema: the version, and per broker heads named for
// it, with 64-hex-digit hashes, a signature, and sequence numbers that do
// not go back.
func (h *Heads) validate() error {
	if h.Version != HeadsVersion {
		return fmt.Errorf("version %d, want %d", h.Version, HeadsVersion)
	}
	if h.Brokers == nil {
		h.Brokers = map[string][]audit.SignedHead{}
	}
	for name, heads := range h.Brokers {
		if name == "" {
			return errors.New("a broker without a name")
		}
		var prev uint64
		for i, s := range heads {
			switch {
			case s.Broker != name:
				return fmt.Errorf("broker %s: head %d is signed for broker %q", name, i+1, s.Broker)
			case !isHash(s.Hash):
				return fmt.Errorf("broker %s: head %d: hash %q is not 64 lowercase hex digits", name, i+1, s.Hash)
			case len(s.Signature) != ed25519.SignatureSize:
				return fmt.Errorf("broker %s: head %d: signature is %d bytes, want %d", name, i+1, len(s.Signature), ed25519.SignatureSize)
			case s.Time.IsZero():
				return fmt.Errorf("broker %s: head %d has no time", name, i+1)
			case s.Seq < prev:
				return fmt.Errorf("broker %s: head %d goes back from entry %d to %d", name, i+1, prev, s.Seq)
			}
			prev = s.Seq
		}
	}
	return nil
}

func isHash(s string) bool {
	if len(s) != 64 {
		return false
	}
	for _, c := range s {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// Record appends s to its broker's heads unless it names the same entry as
// the last one recorded; it reports whether anything was added.
func (h *Heads) Record(s audit.SignedHead) bool {
	heads := h.Brokers[s.Broker]
	if n := len(heads); n > 0 && heads[n-1].Seq == s.Seq && heads[n-1].Hash == s.Hash {
		return false
	}
	h.Brokers[s.Broker] = append(heads, s)
	return true
}

// SaveHeads writes h to path atomically: a temporary file in the same
// folder, synced, then renamed over path.
func SaveHeads(path string, h *Heads) error {
	data, err := json.MarshalIndent(h, "", "  ")
	if err != nil {
		return err
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create audit heads folder: %w", err)
	}
	tmp, err := os.CreateTemp(dir, ".audit-heads-*.tmp")
	if err != nil {
		return fmt.Errorf("write audit heads file: %w", err)
	}
	defer os.Remove(tmp.Name()) // fails harmlessly once renamed
	if _, err := tmp.Write(append(data, '\n')); err != nil {
		tmp.Close()
		return fmt.Errorf("write audit heads file: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("sync audit heads file: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write audit heads file: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("install audit heads file: %w", err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// AuditStatus is the verdict of one broker's audit check.
type AuditStatus string

// Verdicts of CheckAudit, most specific first when several apply.
const (
	AuditOK AuditStatus = "ok"
	// AuditNoKey: the broker list pins no audit key for the broker.
	AuditNoKey AuditStatus = "NO PINNED KEY"
	// AuditBadSignature: no signed head, or one that does not verify
	// under the pinned key or names another broker.
	AuditBadSignature AuditStatus = "BAD SIGNATURE"
	// AuditChainBroken: the entries do not chain from genesis, or the
	// signed head is not their last entry.
	AuditChainBroken AuditStatus = "CHAIN BROKEN"
	// AuditRewritten: an entry an earlier check recorded has another hash.
	AuditRewritten AuditStatus = "REWRITTEN"
	// AuditRolledBack: the log ends before an entry an earlier check
	// recorded (truncated, or an old state restored).
	AuditRolledBack AuditStatus = "ROLLED BACK"
	// AuditUnreachable: the broker's log could not be read.
	AuditUnreachable AuditStatus = "UNREACHABLE"
)

// HeadVerdict is one broker's audit check against the recorded heads.
type HeadVerdict struct {
	Broker  string      `json:"broker"`
	Status  AuditStatus `json:"status"`
	Detail  string      `json:"detail,omitempty"`
	Entries int         `json:"entries"`
	// Seq is the sequence number that differs (REWRITTEN) or that the
	// log no longer reaches (ROLLED BACK).
	Seq  uint64            `json:"seq,omitempty"`
	Head *audit.SignedHead `json:"signed_head,omitempty"`
}

// OK reports whether the broker passed.
func (v HeadVerdict) OK() bool { return v.Status == AuditOK }

// CheckAudit checks broker b's answer ar: the signed head verifies under
// the pinned key and names b, the entries chain from genesis up to the
// signed head, and every head in recorded (an earlier check's) is still in
// the chain at its sequence number.
func CheckAudit(b Broker, ar *audit.Response, recorded []audit.SignedHead) HeadVerdict {
	v := HeadVerdict{Broker: b.Name, Entries: len(ar.Entries), Head: ar.Signed}
	fail := func(s AuditStatus, format string, args ...any) HeadVerdict {
		v.Status, v.Detail = s, fmt.Sprintf(format, args...)
		return v
	}
	if len(b.AuditKey) == 0 {
		return fail(AuditNoKey, "the broker list pins no audit key for %s (embassyctl brokers pin-audit-key %s FILE)", b.Name, b.Name)
	}
	s := ar.Signed
	if s == nil {
		return fail(AuditBadSignature, "the broker sent no signed head")
	}
	if s.Broker != b.Name {
		return fail(AuditBadSignature, "the head is signed for broker %q", s.Broker)
	}
	if err := s.Verify(ed25519.PublicKey(b.AuditKey)); err != nil {
		return fail(AuditBadSignature, "%v", err)
	}
	if _, err := audit.Verify(ar.Entries, nil); err != nil {
		return fail(AuditChainBroken, "%v", err)
	}
	if !s.Matches(ar.Entries) {
		return fail(AuditChainBroken, "the signed head is entry %d, the log has %d entries", s.Seq, len(ar.Entries))
	}
	// Heads are oldest first: the first that differs, after one that still
	// matches, bounds the rewritten entries (the chain links each entry to
	// all before it).
	var matched uint64
	for _, r := range recorded {
		when := r.Time.UTC().Format("2006-01-02 15:04:05Z")
		if r.Seq > s.Seq {
			v.Seq = r.Seq
			return fail(AuditRolledBack, "the log ends at entry %d, entry %d was verified on %s", s.Seq, r.Seq, when)
		}
		if r.Seq == 0 {
			continue
		}
		if got := ar.Entries[r.Seq-1].Hash; got != r.Hash {
			v.Seq = r.Seq
			return fail(AuditRewritten, "entry %d has hash %.16s…, it had %.16s… when verified on %s: one of entries %d-%d was rewritten",
				r.Seq, got, r.Hash, when, matched+1, r.Seq)
		}
		matched = r.Seq
	}
	v.Status = AuditOK
	return v
}

// VerifyHeads fetches every broker's log and signed head, checks them
// against the heads recorded in h (CheckAudit) and records in h the signed
// head of every broker that passed. It reports whether h changed.
func (c *Client) VerifyHeads(ctx context.Context, h *Heads) ([]HeadVerdict, bool) {
	var out []HeadVerdict
	changed := false
	for _, b := range c.Brokers {
		var ar audit.Response
		if err := c.do(ctx, b, http.MethodGet, api.PathAudit, nil, &ar); err != nil {
			out = append(out, HeadVerdict{Broker: b.Name, Status: AuditUnreachable, Detail: err.Error()})
			continue
		}
		v := CheckAudit(b, &ar, h.Brokers[b.Name])
		if v.OK() && h.Record(*ar.Signed) {
			changed = true
		}
		out = append(out, v)
	}
	return out, changed
}

// Package store is the appliance's mirrored, content-addressed object store.
// Every object is written to every healthy disk (temp file, fsync, rename,
// fsync of the directory) before it is acknowledged, every read is verified
// against the object's SHA-256, a bad or missing copy is healed from a good
// one, and a scrubber and a resync walk everything. A "disk" is a directory:
// on the appliance, the mount point of an unlocked LUKS2 volume.
package store

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Errors callers branch on.
var (
	ErrNotFound      = errors.New("object not found")
	ErrConflict      = errors.New("object exists with different content")
	ErrHashMismatch  = errors.New("content does not match the object name")
	ErrInvalidName   = errors.New("invalid namespace or object name")
	ErrNoHealthyDisk = errors.New("no healthy disk left")
	ErrCorrupt       = errors.New("no copy of the object verifies")
)

// DiskState is the health of one disk.
type DiskState string

// Disk states.
const (
	Healthy DiskState = "healthy"
	Syncing DiskState = "syncing" // being resynced: written to, never read from
	Failed  DiskState = "failed"
)

var (
	nsPart  = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)
	hexName = regexp.MustCompile(`^[0-9a-f]{64}$`)
	// Named objects ("config") must not look like a content hash.
	namedObj = regexp.MustCompile(`^[a-z][a-z0-9._-]{0,63}$`)
)

// ValidNamespace checks a namespace: "<repository>/<type>", each part of
// lowercase letters, digits, dots, dashes and underscores.
func ValidNamespace(ns string) error {
	parts := strings.Split(ns, "/")
	if len(parts) != 2 || !nsPart.MatchString(parts[0]) || !nsPart.MatchString(parts[1]) || strings.Contains(ns, "..") {
		return fmt.Errorf("%w: namespace %q", ErrInvalidName, ns)
	}
	return nil
}

type disk struct {
	id         string
	root       string
	state      DiskState
	reason     string
	readErrors atomic.Int64
	healed     atomic.Int64
}

// Store is a set of mirrored disks.
type Store struct {
	log   *slog.Logger
	mu    sync.RWMutex
	disks []*disk
	puts  atomic.Int64
	gets  atomic.Int64
	// fallback fetches an object no local copy of which verifies (from a
	// peer appliance).
	fallback   atomic.Pointer[func(ns, name string) ([]byte, error)]
	peerHealed atomic.Int64
}

// MsgHealedFromPeer is logged when an object whose every local copy failed
// was fetched from a peer and rewritten.
const MsgHealedFromPeer = "object healed from a peer"

// SetFallback sets where objects come from when no local copy verifies.
func (s *Store) SetFallback(fetch func(ns, name string) ([]byte, error)) {
	s.fallback.Store(&fetch)
}

// fromFallback fetches an object whose local copies all failed, checks it
// against its digest and rewrites it on the given disks.
func (s *Store) fromFallback(ns, name, digest string, bad []*disk) ([]byte, error) {
	f := s.fallback.Load()
	if f == nil {
		return nil, ErrCorrupt
	}
	data, err := (*f)(ns, name)
	if err != nil {
		return nil, fmt.Errorf("%w; from a peer: %v", ErrCorrupt, err)
	}
	if digestOf(data) != digest {
		return nil, fmt.Errorf("%w; the peer's copy does not verify either", ErrCorrupt)
	}
	for _, d := range bad {
		s.heal(d, ns, name, digest, data)
	}
	s.peerHealed.Add(1)
	s.log.Warn(MsgHealedFromPeer, "ns", ns, "name", name, "disks", len(bad))
	return data, nil
}

// DiskSpec names a disk and its directory.
type DiskSpec struct {
	ID   string
	Root string
}

// Open opens a store over the given disks. A disk whose directory cannot be
// prepared starts as failed; stale temp files of a crashed writer are
// removed.
func Open(log *slog.Logger, specs []DiskSpec) (*Store, error) {
	if len(specs) == 0 {
		return nil, errors.New("store needs at least one disk")
	}
	s := &Store{log: log}
	seen := map[string]bool{}
	for _, sp := range specs {
		if sp.ID == "" || seen[sp.ID] {
			return nil, fmt.Errorf("disk id %q empty or used twice", sp.ID)
		}
		seen[sp.ID] = true
		d := &disk{id: sp.ID, root: sp.Root, state: Healthy}
		if err := prepare(d.root); err != nil {
			d.state, d.reason = Failed, err.Error()
			log.Error("disk unusable", "disk", d.id, "err", err)
		}
		s.disks = append(s.disks, d)
	}
	return s, nil
}

func prepare(root string) error {
	for _, sub := range []string{"objects", "tmp"} {
		if err := os.MkdirAll(filepath.Join(root, sub), 0o700); err != nil {
			return fmt.Errorf("prepare %s: %w", root, err)
		}
	}
	ents, err := os.ReadDir(filepath.Join(root, "tmp"))
	if err != nil {
		return fmt.Errorf("read temp folder: %w", err)
	}
	for _, e := range ents {
		if err := os.Remove(filepath.Join(root, "tmp", e.Name())); err != nil {
			return fmt.Errorf("remove stale temp file: %w", err)
		}
	}
	return nil
}

// objectPath returns the file of an object. Content-addressed objects fan
// out by their first two hex digits; named objects carry their digest in the
// file name ("config~<sha256>").
func objectPath(root, ns, name, digest string) string {
	if hexName.MatchString(name) {
		return filepath.Join(root, "objects", ns, name[:2], name)
	}
	return filepath.Join(root, "objects", ns, "named", name+"~"+digest)
}

func checkName(ns, name string) error {
	if err := ValidNamespace(ns); err != nil {
		return err
	}
	if !hexName.MatchString(name) && !(namedObj.MatchString(name) && strings.Trim(name, "0123456789abcdef") != "") {
		return fmt.Errorf("%w: object name %q", ErrInvalidName, name)
	}
	return nil
}

func digestOf(data []byte) string {
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])
}

// Put stores an object on every writable disk and returns the ids of the
// disks that hold it. If name is a SHA-256 (64 hex digits) the content must
// hash to it; other names ("config") are verified by the digest kept in the
// file name. Storing the same bytes again succeeds; different bytes under an
// existing name are refused with ErrConflict. Copies are staged as synced
// temp files while the content is hashed, and only renamed into place once
// the hash checks out.
func (s *Store) Put(ns, name string, data []byte) ([]string, error) {
	if err := checkName(ns, name); err != nil {
		return nil, err
	}
	targets := s.writable()
	if len(targets) == 0 {
		return nil, ErrNoHealthyDisk
	}
	contentAddressed := hexName.MatchString(name)
	digestc := make(chan string, 1)
	go func() { digestc <- digestOf(data) }()
	tmps := make([]string, len(targets))
	errs := make([]error, len(targets))
	var wg sync.WaitGroup
	for i, d := range targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if contentAddressed {
				if done, err := hasCopy(d.root, ns, name, name, data); err != nil || done {
					errs[i] = err
					return
				}
			}
			tmps[i], errs[i] = stageCopy(d.root, data)
		}()
	}
	digest := <-digestc
	wg.Wait()
	discard := func() {
		for _, t := range tmps {
			if t != "" {
				os.Remove(t)
			}
		}
	}
	if contentAddressed && digest != name {
		discard()
		return nil, fmt.Errorf("%w: %s has SHA-256 %s", ErrHashMismatch, name, digest)
	}
	if !contentAddressed {
		if existing, err := s.namedDigest(ns, name); err == nil && existing != digest {
			discard()
			return nil, fmt.Errorf("%w: %s/%s", ErrConflict, ns, name)
		}
	}
	for i, d := range targets {
		if errs[i] != nil || tmps[i] == "" {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = commitCopy(d.root, ns, name, digest, tmps[i])
		}()
	}
	wg.Wait()
	var written []string
	healthyLeft := 0
	for i, d := range targets {
		if errs[i] != nil {
			s.fail(d, fmt.Errorf("write %s/%s: %w", ns, name, errs[i]))
			continue
		}
		written = append(written, d.id)
		if s.stateOf(d) == Healthy {
			healthyLeft++
		}
	}
	if healthyLeft == 0 {
		return nil, ErrNoHealthyDisk
	}
	s.puts.Add(1)
	return written, nil
}

// hasCopy reports whether root already holds a good copy of the object. A
// copy that cannot be read (a media error) is not good: the caller writes
// a new one, to new blocks. Only a disk whose objects folder is gone is an
// error.
func hasCopy(root, ns, name, digest string, data []byte) (bool, error) {
	existing, err := os.ReadFile(objectPath(root, ns, name, digest))
	if err == nil {
		// A damaged copy of the same object is replaced by the caller.
		return bytes.Equal(existing, data) || digestOf(existing) == digest, nil
	}
	if _, serr := os.Stat(filepath.Join(root, "objects")); serr != nil {
		return false, serr
	}
	return false, nil
}

// stageCopy writes data to a synced temp file on root.
func stageCopy(root string, data []byte) (string, error) {
	return stage(root, data, true)
}

// stage writes data to a temp file on root, synced if durable.
func stage(root string, data []byte, durable bool) (string, error) {
	var rnd [8]byte
	rand.Read(rnd[:])
	tmp := filepath.Join(root, "tmp", hex.EncodeToString(rnd[:])+".tmp")
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return "", err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(tmp)
		return "", err
	}
	if durable {
		// fdatasync: the data and the file size, without the timestamps.
		if err := unix.Fdatasync(int(f.Fd())); err != nil {
			f.Close()
			os.Remove(tmp)
			return "", err
		}
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return "", err
	}
	return tmp, nil
}

// commitCopy renames a staged copy into place and makes the rename durable.
func commitCopy(root, ns, name, digest, tmp string) error {
	return commit(root, ns, name, digest, tmp, true)
}

// commit renames a staged copy into place, durably if asked.
func commit(root, ns, name, digest, tmp string, durable bool) error {
	final := objectPath(root, ns, name, digest)
	if err := ensureDir(root, filepath.Dir(final)); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, final); err != nil {
		os.Remove(tmp)
		return err
	}
	if !durable {
		return nil
	}
	return syncDir(filepath.Dir(final))
}

// writeCopy writes one copy atomically and durably, unless a good copy is
// there already.
func writeCopy(root, ns, name, digest string, data []byte) error {
	if done, err := hasCopy(root, ns, name, digest, data); err != nil || done {
		return err
	}
	tmp, err := stageCopy(root, data)
	if err != nil {
		return err
	}
	return commitCopy(root, ns, name, digest, tmp)
}

// ensureDir creates dir and any missing parents below root, making each new
// directory entry durable in its parent.
func ensureDir(root, dir string) error {
	if _, err := os.Stat(dir); err == nil {
		return nil
	}
	rel, err := filepath.Rel(root, dir)
	if err != nil {
		return err
	}
	cur := root
	for _, part := range strings.Split(rel, string(filepath.Separator)) {
		next := filepath.Join(cur, part)
		if err := os.Mkdir(next, 0o700); err == nil {
			if err := syncDir(cur); err != nil {
				return err
			}
		} else if !errors.Is(err, fs.ErrExist) {
			return err
		}
		cur = next
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func (s *Store) writable() []*disk {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out []*disk
	for _, d := range s.disks {
		if d.state == Healthy || d.state == Syncing {
			out = append(out, d)
		}
	}
	return out
}

func (s *Store) readable() []*disk {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out []*disk
	for _, d := range s.disks {
		if d.state == Healthy {
			out = append(out, d)
		}
	}
	return out
}

func (s *Store) stateOf(d *disk) DiskState {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return d.state
}

func (s *Store) fail(d *disk, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if d.state == Failed {
		return
	}
	d.state, d.reason = Failed, err.Error()
	s.log.Error("disk failed; store is degraded", "disk", d.id, "err", err)
}

// namedDigest finds the digest of a named object on any readable disk.
func (s *Store) namedDigest(ns, name string) (string, error) {
	for _, d := range s.readable() {
		m, _ := filepath.Glob(filepath.Join(d.root, "objects", ns, "named", name+"~*"))
		for _, p := range m {
			dg := strings.TrimPrefix(filepath.Base(p), name+"~")
			if hexName.MatchString(dg) {
				return dg, nil
			}
		}
	}
	return "", ErrNotFound
}

// digestFor returns the digest an object's copies must hash to: its name
// for content-addressed objects, the digest kept in the file name for named
// ones.
func (s *Store) digestFor(ns, name string) (string, error) {
	if hexName.MatchString(name) {
		return name, nil
	}
	dg, err := s.namedDigest(ns, name)
	if err != nil {
		return "", fmt.Errorf("%s/%s: %w", ns, name, err)
	}
	return dg, nil
}

// Get returns a verified copy of an object, healing bad or missing copies
// on the other healthy disks from it.
func (s *Store) Get(ns, name string) ([]byte, error) {
	if err := checkName(ns, name); err != nil {
		return nil, err
	}
	digest, err := s.digestFor(ns, name)
	if err != nil {
		return nil, err
	}
	s.gets.Add(1)
	disks := s.readable()
	if len(disks) == 0 {
		return nil, ErrNoHealthyDisk
	}
	var bad []*disk
	var good []byte
	sawCopy := false
	for _, d := range disks {
		data, err := os.ReadFile(objectPath(d.root, ns, name, digest))
		if err != nil {
			if !errors.Is(err, fs.ErrNotExist) {
				sawCopy = true
				s.readError(d, fmt.Errorf("read %s/%s: %w", ns, name, err))
			}
			bad = append(bad, d)
			continue
		}
		sawCopy = true
		if digestOf(data) != digest {
			d.readErrors.Add(1)
			s.log.Warn("object copy does not verify", "disk", d.id, "ns", ns, "name", name)
			bad = append(bad, d)
			continue
		}
		good = data
		break
	}
	if good == nil {
		if !sawCopy {
			return nil, fmt.Errorf("%s/%s: %w", ns, name, ErrNotFound)
		}
		data, err := s.fromFallback(ns, name, digest, bad)
		if err != nil {
			return nil, fmt.Errorf("%s/%s: %w", ns, name, err)
		}
		return data, nil
	}
	for _, d := range bad {
		s.heal(d, ns, name, digest, good)
	}
	// Disks after the one that served the read are checked by the scrubber.
	return good, nil
}

func (s *Store) heal(d *disk, ns, name, digest string, good []byte) {
	if err := writeCopy(d.root, ns, name, digest, good); err != nil {
		s.fail(d, fmt.Errorf("heal %s/%s: %w", ns, name, err))
		return
	}
	d.healed.Add(1)
	s.log.Info("healed object copy", "disk", d.id, "ns", ns, "name", name)
}

// readError counts a read error on d and fails the disk if its root is gone.
func (s *Store) readError(d *disk, err error) {
	d.readErrors.Add(1)
	s.log.Warn("read error", "disk", d.id, "err", err)
	if _, serr := os.Stat(filepath.Join(d.root, "objects")); serr != nil {
		s.fail(d, fmt.Errorf("disk root unreadable: %w", serr))
	}
}

// Has reports whether the object is present on a readable disk.
func (s *Store) Has(ns, name string) (int64, bool) {
	if checkName(ns, name) != nil {
		return 0, false
	}
	digest, err := s.digestFor(ns, name)
	if err != nil {
		return 0, false
	}
	for _, d := range s.readable() {
		if st, err := os.Stat(objectPath(d.root, ns, name, digest)); err == nil {
			return st.Size(), true
		}
	}
	return 0, false
}

// ObjectInfo is one listed object.
type ObjectInfo struct {
	Name string
	Size int64
}

// List returns the objects of a namespace present on any readable disk.
func (s *Store) List(ns string) ([]ObjectInfo, error) {
	if err := ValidNamespace(ns); err != nil {
		return nil, err
	}
	seen := map[string]int64{}
	disks := s.readable()
	if len(disks) == 0 {
		return nil, ErrNoHealthyDisk
	}
	for _, d := range disks {
		if err := walkNamespace(d.root, ns, func(name, _ string, size int64) {
			seen[name] = size
		}); err != nil {
			s.readError(d, err)
		}
	}
	out := make([]ObjectInfo, 0, len(seen))
	for n, sz := range seen {
		out = append(out, ObjectInfo{Name: n, Size: sz})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// walkNamespace calls fn for every object file of ns under root.
func walkNamespace(root, ns string, fn func(name, digest string, size int64)) error {
	base := filepath.Join(root, "objects", ns)
	subs, err := os.ReadDir(base)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, sub := range subs {
		ents, err := os.ReadDir(filepath.Join(base, sub.Name()))
		if err != nil {
			return err
		}
		for _, e := range ents {
			info, err := e.Info()
			if err != nil {
				continue
			}
			n := e.Name()
			if sub.Name() == "named" {
				name, dg, ok := strings.Cut(n, "~")
				if ok && namedObj.MatchString(name) && hexName.MatchString(dg) {
					fn(name, dg, info.Size())
				}
				continue
			}
			if hexName.MatchString(n) && n[:2] == sub.Name() {
				fn(n, n, info.Size())
			}
		}
	}
	return nil
}

// Namespaces lists the namespaces present on readable disks.
func (s *Store) Namespaces() ([]string, error) {
	seen := map[string]bool{}
	for _, d := range s.readable() {
		repos, err := os.ReadDir(filepath.Join(d.root, "objects"))
		if err != nil {
			s.readError(d, err)
			continue
		}
		for _, r := range repos {
			types, err := os.ReadDir(filepath.Join(d.root, "objects", r.Name()))
			if err != nil {
				continue
			}
			for _, t := range types {
				ns := r.Name() + "/" + t.Name()
				if ValidNamespace(ns) == nil {
					seen[ns] = true
				}
			}
		}
	}
	out := make([]string, 0, len(seen))
	for ns := range seen {
		out = append(out, ns)
	}
	sort.Strings(out)
	return out, nil
}

// Delete removes an object from every writable disk.
func (s *Store) Delete(ns, name string) error {
	if err := checkName(ns, name); err != nil {
		return err
	}
	digest, err := s.digestFor(ns, name)
	if err != nil {
		return err
	}
	found := false
	for _, d := range s.writable() {
		p := objectPath(d.root, ns, name, digest)
		err := os.Remove(p)
		if err == nil {
			found = true
			if err := syncDir(filepath.Dir(p)); err != nil {
				s.fail(d, err)
			}
			continue
		}
		if !errors.Is(err, fs.ErrNotExist) {
			s.fail(d, fmt.Errorf("delete %s/%s: %w", ns, name, err))
		}
	}
	if !found {
		return fmt.Errorf("%s/%s: %w", ns, name, ErrNotFound)
	}
	return nil
}

// DiskStatus reports one disk.
type DiskStatus struct {
	ID         string    `json:"id"`
	State      DiskState `json:"state"`
	Reason     string    `json:"reason,omitempty"`
	ReadErrors int64     `json:"read_errors"`
	Healed     int64     `json:"healed"`
}

// Status reports every disk and whether the store is degraded.
func (s *Store) Status() (disks []DiskStatus, degraded bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, d := range s.disks {
		disks = append(disks, DiskStatus{ID: d.id, State: d.state, Reason: d.reason, ReadErrors: d.readErrors.Load(), Healed: d.healed.Load()})
		if d.state != Healthy {
			degraded = true
		}
	}
	return disks, degraded
}

// MarkFailed fails a disk from outside (it was pulled out, its device is
// gone). A disk that failed already keeps its first reason.
func (s *Store) MarkFailed(id, reason string) {
	if d := s.find(id); d != nil {
		s.fail(d, errors.New(reason))
	}
}

// RemoveDisk forgets a failed disk (it was pulled out).
func (s *Store) RemoveDisk(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, d := range s.disks {
		if d.id == id {
			if d.state != Failed {
				return fmt.Errorf("disk %s is %s; only a failed disk can be removed", id, d.state)
			}
			s.disks = append(s.disks[:i], s.disks[i+1:]...)
			return nil
		}
	}
	return fmt.Errorf("no disk %s", id)
}

// AddDisk adds a replacement disk in the syncing state: new objects are
// written to it at once, but it serves no read until Resync completes.
func (s *Store) AddDisk(spec DiskSpec) error {
	if err := prepare(spec.Root); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, d := range s.disks {
		if d.id == spec.ID {
			return fmt.Errorf("disk id %s already in the store", spec.ID)
		}
	}
	s.disks = append(s.disks, &disk{id: spec.ID, root: spec.Root, state: Syncing})
	return nil
}

// Package store is the appliance's mirrored, content-addressed object store.
// Every object is written to every healthy disk (temp file, fsync, rename,
// fsync of the directory) before it is acknowledged, every read is verified
// against the object's SHA-256, a bad or missing copy is healed from a good
// one, and a scrubber and a resync walk everything. A "disk" is a directory:
// on the appliance, the mount point of an unlocked LUKS2 volume.
package store

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/dataembassy/embassy/appliance/objref"
)

// Errors callers branch on.
var (
	ErrNotFound = errors.New("object not found")
	ErrConflict = errors.New("object exists with different content")
	// ErrHashMismatch and ErrInvalidName are objref's, so that one
	// errors.Is answers for the store and the name grammar alike.
	ErrHashMismatch  = objref.ErrHashMismatch
	ErrInvalidName   = objref.ErrInvalid
	ErrNoHealthyDisk = errors.New("no healthy disk left")
	ErrCorrupt       = errors.New("no copy of the object verifies")
)

// Store is a set of mirrored disks.
type Store struct {
	log   *slog.Logger
	mu    sync.RWMutex
	disks []*disk
	// fallback fetches an object no local copy of which verifies (from a
	// peer appliance).
	fallback atomic.Pointer[func(ns, name string) ([]byte, error)]
	metrics  metrics
	quota    quotas
}

// MsgHealedFromPeer is logged when an object whose every local copy failed
// was fetched from a peer and rewritten.
const MsgHealedFromPeer = "object healed from a peer"

// Log messages of healing and scrubbing.
const (
	// MsgHealedCopy: a bad copy was rewritten from a good one.
	MsgHealedCopy = "healed object copy"
	// MsgScrubStarted: a scrub begins walking every object.
	MsgScrubStarted = "scrub started"
)

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
	if objref.Digest(data) != digest {
		return nil, fmt.Errorf("%w; the peer's copy does not verify either", ErrCorrupt)
	}
	for _, d := range bad {
		s.heal(d, ns, name, digest, data)
	}
	s.metrics.peerHealed.Inc()
	s.log.Warn(MsgHealedFromPeer, "ns", ns, "name", name, "disks", len(bad))
	return data, nil
}

// DiskSpec names a disk and its directory.
type DiskSpec struct {
	ID   string
	Root string
	// Unavailable, when set, is why the disk is one of the store's but
	// cannot be used (its header was refused, say): it starts as failed,
	// so the store reports itself degraded, and is never read or written.
	Unavailable string
}

// Open opens a store over the given disks. A disk whose directory cannot be
// prepared starts as failed; stale temp files of a crashed writer are
// removed.
func Open(log *slog.Logger, specs []DiskSpec) (*Store, error) {
	if len(specs) == 0 {
		return nil, errors.New("store needs at least one disk")
	}
	s := &Store{log: log, metrics: newMetrics()}
	seen := map[string]bool{}
	for _, sp := range specs {
		if sp.ID == "" || seen[sp.ID] {
			return nil, fmt.Errorf("disk id %q empty or used twice", sp.ID)
		}
		seen[sp.ID] = true
		d := &disk{id: sp.ID, root: sp.Root, state: Healthy}
		if sp.Unavailable != "" {
			d.state, d.reason = Failed, sp.Unavailable
			log.Error("disk unusable", "disk", d.id, "err", sp.Unavailable)
		} else if err := prepare(d.root); err != nil {
			d.state, d.reason = Failed, err.Error()
			log.Error("disk unusable", "disk", d.id, "err", err)
		}
		s.disks = append(s.disks, d)
	}
	return s, nil
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
	contentAddressed := objref.ContentAddressed(name)
	digestc := make(chan string, 1)
	go func() { digestc <- objref.Digest(data) }()
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
	// A disk without space is full, not failed: nothing is acknowledged
	// and every disk keeps serving reads.
	var full error
	for i, d := range targets {
		if errs[i] != nil && noSpace(errs[i]) {
			s.markFull(d, errs[i])
			full = errs[i]
		}
	}
	if full != nil {
		discard()
		return nil, fmt.Errorf("%w: %s/%s: %v", ErrFull, ns, name, full)
	}
	grows := false
	for _, t := range tmps {
		grows = grows || t != ""
	}
	if grows {
		if err := s.reserve(ns, int64(len(data))); err != nil {
			discard()
			return nil, err
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
			if noSpace(errs[i]) {
				s.markFull(d, errs[i])
				full = errs[i]
				continue
			}
			s.fail(d, fmt.Errorf("write %s/%s: %w", ns, name, errs[i]))
			continue
		}
		s.markRoom(d)
		written = append(written, d.id)
		if s.stateOf(d) == Healthy {
			healthyLeft++
		}
	}
	if full != nil {
		// Not acknowledged: the retry counts it again.
		s.release(ns, int64(len(data)))
		return nil, fmt.Errorf("%w: %s/%s: %v", ErrFull, ns, name, full)
	}
	if healthyLeft == 0 {
		return nil, ErrNoHealthyDisk
	}
	s.metrics.puts.Inc()
	return written, nil
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
	s.metrics.gets.Inc()
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
		if objref.Digest(data) != digest {
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
		if noSpace(err) {
			s.markFull(d, err) // the scrubber tries again later
			return
		}
		s.fail(d, fmt.Errorf("heal %s/%s: %w", ns, name, err))
		return
	}
	d.healed.Add(1)
	s.log.Info(MsgHealedCopy, "disk", d.id, "ns", ns, "name", name)
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
	if _, _, err := objref.ParseNamespace(ns); err != nil {
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
				if _, _, err := objref.ParseNamespace(ns); err == nil {
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
	var size int64
	for _, d := range s.writable() {
		p := objectPath(d.root, ns, name, digest)
		size = max(size, objectSize(d, ns, name, digest))
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
	s.release(ns, size)
	return nil
}

package store

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"

	"github.com/dataembassy/embassy/appliance/objref"
)

// Space errors. Neither fails a disk: a full disk is still a good disk.
var (
	// ErrFull: a disk the object must be mirrored to has no space left.
	// The object is not acknowledged; reads go on from every disk.
	ErrFull = errors.New("no space left on a disk")
	// ErrQuota: storing the object would take its repository over the
	// quota of the image config.
	ErrQuota = errors.New("repository quota exceeded")
)

// Log messages of disk space.
const (
	// MsgDiskFull: a write found a disk full. Writes are refused (507)
	// until one succeeds again; reads go on. Logged once per episode.
	MsgDiskFull = "disk full"
	// MsgDiskRoom: a write succeeded on a disk that was full.
	MsgDiskRoom = "disk has room again"
)

// noSpace reports whether a write failed for want of space (or of the
// filesystem's quota), not because the disk is bad.
func noSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}

func (s *Store) markFull(d *disk, err error) {
	if !d.full.Swap(true) {
		s.log.Error(MsgDiskFull, "disk", d.id, "err", err)
	}
}

func (s *Store) markRoom(d *disk) {
	if d.full.Swap(false) {
		s.log.Info(MsgDiskRoom, "disk", d.id)
	}
}

// quotas holds each repository's limit and the bytes its objects take.
type quotas struct {
	mu    sync.Mutex
	limit map[string]int64 // repository -> bytes; absent: no quota
	used  map[string]int64
}

// SetQuotas sets the repositories' space quotas in bytes (a repository
// not listed has none) and counts what each already holds on a readable
// disk. Replicated and ingested objects count alike: the quota bounds the
// repository, whoever writes to it.
func (s *Store) SetQuotas(limits map[string]int64) error {
	for repo, l := range limits {
		if l <= 0 {
			return fmt.Errorf("quota of repository %q is %d bytes", repo, l)
		}
	}
	used := map[string]int64{}
	disks := s.readable()
	if len(disks) > 0 && len(limits) > 0 {
		nss, err := s.Namespaces()
		if err != nil {
			return err
		}
		for _, ns := range nss {
			repo, _, err := objref.ParseNamespace(ns)
			if err != nil {
				continue
			}
			if _, limited := limits[repo]; !limited {
				continue
			}
			if err := walkNamespace(disks[0].root, ns, func(_, _ string, size int64) { used[repo] += size }); err != nil {
				return fmt.Errorf("count repository %s: %w", repo, err)
			}
		}
	}
	s.quota.mu.Lock()
	defer s.quota.mu.Unlock()
	s.quota.limit, s.quota.used = limits, used
	return nil
}

// reserve counts n more bytes against ns's repository, or refuses them.
func (s *Store) reserve(ns string, n int64) error {
	repo, _, err := objref.ParseNamespace(ns)
	if err != nil {
		return err
	}
	s.quota.mu.Lock()
	defer s.quota.mu.Unlock()
	limit, ok := s.quota.limit[repo]
	if !ok {
		return nil
	}
	if s.quota.used[repo]+n > limit {
		return fmt.Errorf("%w: %s holds %d of %d bytes, %d more refused", ErrQuota, repo, s.quota.used[repo], limit, n)
	}
	s.quota.used[repo] += n
	return nil
}

// release gives back n bytes of ns's repository.
func (s *Store) release(ns string, n int64) {
	repo, _, err := objref.ParseNamespace(ns)
	if err != nil {
		return
	}
	s.quota.mu.Lock()
	defer s.quota.mu.Unlock()
	if _, ok := s.quota.limit[repo]; ok {
		s.quota.used[repo] = max(0, s.quota.used[repo]-n)
	}
}

// Usage returns the bytes each repository with a quota holds, and its
// quota.
func (s *Store) Usage() (used, limit map[string]int64) {
	s.quota.mu.Lock()
	defer s.quota.mu.Unlock()
	used, limit = map[string]int64{}, map[string]int64{}
	for r, l := range s.quota.limit {
		used[r], limit[r] = s.quota.used[r], l
	}
	return used, limit
}

// objectSize is the size of an object's copy on d, or 0.
func objectSize(d *disk, ns, name, digest string) int64 {
	if st, err := os.Stat(objectPath(d.root, ns, name, digest)); err == nil {
		return st.Size()
	}
	return 0
}

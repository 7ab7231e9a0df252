package store

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/dataembassy/embassy/appliance/objref"
	"golang.org/x/sys/unix"
)

// Progress is reported while a scrub or resync runs.
type Progress struct {
	Phase   string // "scrub" or "resync"
	Done    int
	Total   int
	Bytes   int64
	Elapsed time.Duration
}

// ScrubReport summarises a scrub.
type ScrubReport struct {
	Objects       int   `json:"objects"`
	CopiesChecked int   `json:"copies_checked"`
	Healed        int   `json:"healed"`
	Unrecoverable int   `json:"unrecoverable"`
	Bytes         int64 `json:"bytes"`
	Duration      time.Duration
}

type objectRef struct {
	ns, name, digest string
}

// inventory lists every object on the given disks.
func (s *Store) inventory(disks []*disk) ([]objectRef, error) {
	seen := map[objectRef]bool{}
	var out []objectRef
	nss, err := s.Namespaces()
	if err != nil {
		return nil, err
	}
	for _, ns := range nss {
		for _, d := range disks {
			err := walkNamespace(d.root, ns, func(name, digest string, _ int64) {
				r := objectRef{ns, name, digest}
				if !seen[r] {
					seen[r] = true
					out = append(out, r)
				}
			})
			if err != nil {
				s.readError(d, err)
			}
		}
	}
	return out, nil
}

// Scrub reads and verifies every copy of every object on the healthy disks,
// rewrites bad or missing copies from a good one, and reports progress about
// once a second.
func (s *Store) Scrub(ctx context.Context, progress func(Progress)) (*ScrubReport, error) {
	start := time.Now()
	disks := s.readable()
	if len(disks) == 0 {
		return nil, ErrNoHealthyDisk
	}
	objs, err := s.inventory(disks)
	if err != nil {
		return nil, err
	}
	rep := &ScrubReport{Objects: len(objs)}
	s.log.Info(MsgScrubStarted, "objects", len(objs), "disks", len(disks))
	last := time.Now()
	for i, o := range objs {
		if err := ctx.Err(); err != nil {
			return rep, err
		}
		var good []byte
		var bad []*disk
		for _, d := range s.readable() {
			data, err := os.ReadFile(objectPath(d.root, o.ns, o.name, o.digest))
			rep.CopiesChecked++
			if err != nil {
				if !errors.Is(err, fs.ErrNotExist) {
					s.readError(d, err)
				}
				bad = append(bad, d)
				continue
			}
			rep.Bytes += int64(len(data))
			if objref.Digest(data) != o.digest {
				d.readErrors.Add(1)
				bad = append(bad, d)
				continue
			}
			if good == nil {
				good = data
			}
		}
		switch {
		case good == nil:
			if _, err := s.fromFallback(o.ns, o.name, o.digest, bad); err == nil {
				rep.Healed += len(bad)
				break
			}
			rep.Unrecoverable++
			s.log.Error("object has no good copy", "ns", o.ns, "name", o.name)
		case len(bad) > 0:
			for _, d := range bad {
				s.heal(d, o.ns, o.name, o.digest, good)
				rep.Healed++
			}
		}
		if progress != nil && (time.Since(last) >= time.Second || i == len(objs)-1) {
			last = time.Now()
			progress(Progress{Phase: "scrub", Done: i + 1, Total: len(objs), Bytes: rep.Bytes, Elapsed: time.Since(start)})
		}
	}
	rep.Duration = time.Since(start)
	s.log.Info("scrub finished", "objects", rep.Objects, "copies", rep.CopiesChecked, "healed", rep.Healed,
		"unrecoverable", rep.Unrecoverable, "duration", rep.Duration)
	if rep.Unrecoverable > 0 {
		return rep, fmt.Errorf("%d objects have no good copy: %w", rep.Unrecoverable, ErrCorrupt)
	}
	return rep, nil
}

// resyncWorkers copy objects onto a replacement disk in parallel.
const resyncWorkers = 4

// Resync copies every object the healthy disks hold onto the syncing disk
// id, each verified against its digest on the way, then flushes the disk's
// filesystem once (syncfs) and only then marks it healthy. Copies are not
// fsynced one by one: until the disk is healthy nothing depends on them.
// Objects written meanwhile already reach the disk through Put.
func (s *Store) Resync(ctx context.Context, id string, progress func(Progress)) (*ScrubReport, error) {
	start := time.Now()
	target := s.find(id)
	if target == nil {
		return nil, fmt.Errorf("no disk %s", id)
	}
	if st := s.stateOf(target); st != Syncing {
		return nil, fmt.Errorf("disk %s is %s, not syncing", id, st)
	}
	sources := s.readable()
	if len(sources) == 0 {
		return nil, ErrNoHealthyDisk
	}
	objs, err := s.inventory(sources)
	if err != nil {
		return nil, err
	}
	rep := &ScrubReport{Objects: len(objs)}
	var mu sync.Mutex
	var firstErr error
	done := 0
	last := time.Now()
	work := make(chan objectRef)
	var wg sync.WaitGroup
	for w := 0; w < resyncWorkers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for o := range work {
				copied, n, err := s.resyncOne(target, o)
				mu.Lock()
				done++
				switch {
				case errors.Is(err, ErrCorrupt) || errors.Is(err, ErrNotFound):
					rep.Unrecoverable++
				case err != nil && firstErr == nil:
					firstErr = err
				case copied:
					rep.Healed++
					rep.Bytes += n
				}
				if progress != nil && time.Since(last) >= time.Second {
					last = time.Now()
					progress(Progress{Phase: "resync", Done: done, Total: len(objs), Bytes: rep.Bytes, Elapsed: time.Since(start)})
				}
				mu.Unlock()
			}
		}()
	}
	for _, o := range objs {
		if ctx.Err() != nil || s.stateOf(target) == Failed {
			break
		}
		work <- o
	}
	close(work)
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return rep, err
	}
	if firstErr != nil {
		s.fail(target, fmt.Errorf("resync: %w", firstErr))
		return rep, firstErr
	}
	if s.stateOf(target) == Failed {
		return rep, fmt.Errorf("disk %s failed during resync", id)
	}
	if err := syncFS(target.root); err != nil {
		s.fail(target, fmt.Errorf("resync flush: %w", err))
		return rep, err
	}
	if progress != nil {
		progress(Progress{Phase: "resync", Done: len(objs), Total: len(objs), Bytes: rep.Bytes, Elapsed: time.Since(start)})
	}
	s.mu.Lock()
	if target.state == Syncing {
		target.state = Healthy
	}
	s.mu.Unlock()
	rep.Duration = time.Since(start)
	s.log.Info("resync finished", "disk", id, "objects", rep.Objects, "copied", rep.Healed, "bytes", rep.Bytes, "duration", rep.Duration)
	if rep.Unrecoverable > 0 {
		return rep, fmt.Errorf("%d objects could not be copied: %w", rep.Unrecoverable, ErrCorrupt)
	}
	return rep, nil
}

// resyncOne copies one object onto target unless a good copy is there.
func (s *Store) resyncOne(target *disk, o objectRef) (bool, int64, error) {
	if data, err := os.ReadFile(objectPath(target.root, o.ns, o.name, o.digest)); err == nil && objref.Digest(data) == o.digest {
		return false, 0, nil
	}
	// Stream a copy from the first healthy disk through the hash; only a
	// copy that verifies is renamed into place.
	for _, src := range s.readable() {
		tmp, n, err := streamVerified(objectPath(src.root, o.ns, o.name, o.digest), target.root, o.digest)
		if err != nil {
			if !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, ErrCorrupt) {
				return false, 0, err // the target failed
			}
			continue
		}
		if err := commit(target.root, o.ns, o.name, o.digest, tmp, false); err != nil {
			return false, 0, err
		}
		return true, n, nil
	}
	// No source copy verified on the way: Get heals what it can or reports.
	good, err := s.Get(o.ns, o.name)
	if err != nil {
		return false, 0, err
	}
	tmp, err := stage(target.root, good, false)
	if err != nil {
		return false, 0, err
	}
	if err := commit(target.root, o.ns, o.name, o.digest, tmp, false); err != nil {
		return false, 0, err
	}
	return true, int64(len(good)), nil
}

var copyBufs = sync.Pool{New: func() any { b := make([]byte, 1<<20); return &b }}

// streamVerified copies src into a temp file on root while hashing it. It
// returns ErrCorrupt (and removes the temp file) if the content does not
// hash to digest, and a source read error as fs.ErrNotExist-wrapped.
func streamVerified(src, root, digest string) (string, int64, error) {
	in, err := os.Open(src)
	if err != nil {
		return "", 0, fmt.Errorf("%w: %v", fs.ErrNotExist, err)
	}
	defer in.Close()
	var rnd [8]byte
	rand.Read(rnd[:])
	tmp := filepath.Join(root, "tmp", hex.EncodeToString(rnd[:])+".tmp")
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return "", 0, err
	}
	h := sha256.New()
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	var n int64
	for {
		k, rerr := in.Read(*bp)
		if k > 0 {
			h.Write((*bp)[:k])
			if _, werr := out.Write((*bp)[:k]); werr != nil {
				out.Close()
				os.Remove(tmp)
				return "", 0, werr
			}
			n += int64(k)
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			out.Close()
			os.Remove(tmp)
			return "", 0, fmt.Errorf("%w: %v", fs.ErrNotExist, rerr)
		}
	}
	if err := out.Close(); err != nil {
		os.Remove(tmp)
		return "", 0, err
	}
	if hex.EncodeToString(h.Sum(nil)) != digest {
		os.Remove(tmp)
		return "", 0, ErrCorrupt
	}
	return tmp, n, nil
}

// syncFS flushes the whole filesystem holding dir.
func syncFS(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Syncfs(int(f.Fd()))
}

func (s *Store) find(id string) *disk {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, d := range s.disks {
		if d.id == id {
			return d
		}
	}
	return nil
}

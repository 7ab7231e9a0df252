package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
)

// DiskState is the health of one disk.
type DiskState string

// Disk states.
const (
	Healthy DiskState = "healthy"
	Syncing DiskState = "syncing" // being resynced: written to, never read from
	Failed  DiskState = "failed"
)

type disk struct {
	id         string
	root       string
	state      DiskState
	reason     string
	readErrors atomic.Int64
	healed     atomic.Int64
	full       atomic.Bool // the last write found no space (space.go)
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

// writable are the disks every write goes to: healthy and syncing ones.
func (s *Store) writable() []*disk { return s.disksIn(Healthy, Syncing) }

// readable are the disks reads are served from: healthy ones only (a
// syncing disk may not hold an object yet).
func (s *Store) readable() []*disk { return s.disksIn(Healthy) }

func (s *Store) disksIn(states ...DiskState) []*disk {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out []*disk
	for _, d := range s.disks {
		if slices.Contains(states, d.state) {
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

// DiskStatus reports one disk.
type DiskStatus struct {
	ID         string    `json:"id"`
	State      DiskState `json:"state"`
	Reason     string    `json:"reason,omitempty"`
	ReadErrors int64     `json:"read_errors"`
	Healed     int64     `json:"healed"`
	// Full: the last write found no space. The disk still serves reads;
	// writes are refused until one succeeds again.
	Full bool `json:"full,omitempty"`
}

// Status reports every disk and whether the store is degraded.
func (s *Store) Status() (disks []DiskStatus, degraded bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, d := range s.disks {
		disks = append(disks, DiskStatus{ID: d.id, State: d.state, Reason: d.reason, ReadErrors: d.readErrors.Load(), Healed: d.healed.Load(), Full: d.full.Load()})
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

// Package volumes opens the appliance's data disks: it unlocks our LUKS2
// volumes with the secrets the brokers released (luks.go, dm-crypt) and
// mounts their ext4 filesystems, provisions approved blank disks (GPT,
// LUKS2, mkfs.ext4), and closes everything again on lockdown.
package volumes

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/dataembassy/embassy/disks/discover"
	"github.com/dataembassy/embassy/disks/fs"
	"github.com/dataembassy/embassy/disks/luks2"
	"github.com/dataembassy/embassy/disks/provision"
)

// MountRoot is where data volumes are mounted.
const MountRoot = "/run/embassy/disks"

// Volume is an unlocked, mounted data disk.
type Volume struct {
	Disk       string `json:"disk"`
	UUID       string `json:"uuid"`
	Mapping    string `json:"mapping"`
	MountPoint string `json:"mount_point"`
	Serial     string `json:"serial,omitempty"`
	// Device is the LUKS partition under the mapping.
	Device string `json:"device"`
}

// Manager keeps track of open volumes.
type Manager struct {
	Log  *slog.Logger
	mu   sync.Mutex
	open []Volume
	// stale are closed volumes whose mapping was still busy (their disk
	// vanished under a mounted filesystem); CloseAll tries again.
	stale []Volume
}

// How long CloseAll retries removing a busy mapping (while a lazily
// detached filesystem lets go) before it drops the key in place.
const (
	closeRetries = 20
	retryDelay   = 100 * time.Millisecond
)

// PartitionPath names partition idx of a disk device: vda -> vda1,
// nvme0n1 -> nvme0n1p1.
func PartitionPath(disk string, idx uint) string {
	if last := disk[len(disk)-1]; last >= '0' && last <= '9' {
		return fmt.Sprintf("%sp%d", disk, idx)
	}
	return fmt.Sprintf("%s%d", disk, idx)
}

func mappingName(uuid string) string { return "embassy-" + strings.ReplaceAll(uuid, "-", "")[:12] }

func waitFor(path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		} else if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear: %w", path, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Open unlocks and mounts one of our disks.
func (m *Manager) Open(d discover.Disk, secret []byte) (Volume, error) {
	part := PartitionPath(d.Path, d.PartitionIndex)
	if err := waitFor(part, 5*time.Second); err != nil {
		return Volume{}, err
	}
	name := mappingName(d.LUKSUUID)
	mapper, err := luks2.Unlock(part, secret, name)
	if err != nil {
		return Volume{}, err
	}
	v := Volume{Disk: d.Name, UUID: d.LUKSUUID, Mapping: name, MountPoint: filepath.Join(MountRoot, d.LUKSUUID), Serial: d.Serial, Device: part}
	if err := fs.Mount(mapper, v.MountPoint); err != nil {
		luks2.Lock(name)
		return Volume{}, err
	}
	m.mu.Lock()
	m.open = append(m.open, v)
	m.mu.Unlock()
	m.Log.Info("volume unlocked and mounted", "disk", d.Name, "uuid", d.LUKSUUID, "mount", v.MountPoint)
	return v, nil
}

// Provision turns a blank disk into one of ours with the given unlock
// secret, creates its filesystem, and returns the LUKS UUID. The volume is
// left closed; Open it once its secret's shares are deposited.
func (m *Manager) Provision(ctx context.Context, d discover.Disk, secret []byte) (string, error) {
	if d.Kind != discover.Blank {
		return "", fmt.Errorf("disk %s is %s, not blank", d.Name, d.Kind)
	}
	start := time.Now()
	res, err := provision.Disk(d.Path, secret)
	if err != nil {
		return "", err
	}
	m.Log.Info("disk partitioned and formatted", "disk", d.Name, "uuid", res.LUKSUUID, "progress", "1/3")
	part := PartitionPath(d.Path, 1)
	if err := waitFor(part, 10*time.Second); err != nil {
		return "", err
	}
	name := mappingName(res.LUKSUUID)
	mapper, err := luks2.Unlock(part, secret, name)
	if err != nil {
		return "", err
	}
	defer luks2.Lock(name)
	m.Log.Info("volume opened for mkfs", "disk", d.Name, "progress", "2/3")
	if err := fs.MakeExt4(ctx, mapper, "embassy-data"); err != nil {
		return "", err
	}
	m.Log.Info("filesystem created", "disk", d.Name, "uuid", res.LUKSUUID, "progress", "3/3", "elapsed_ms", time.Since(start).Milliseconds())
	return res.LUKSUUID, nil
}

// Volumes returns the open volumes.
func (m *Manager) Volumes() []Volume {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]Volume(nil), m.open...)
}

// Close unmounts one volume (detaching it if its disk is gone) and closes
// its mapping. The volume is forgotten even if closing fails: its disk is
// not used again until it is unlocked anew. A mapping still busy is kept
// to retry (ReleaseStale, CloseAll).
func (m *Manager) Close(uuid string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i, v := range m.open {
		if v.UUID != uuid {
			continue
		}
		m.open = append(m.open[:i], m.open[i+1:]...)
		err := fs.Unmount(v.MountPoint)
		if err != nil {
			err = fs.Detach(v.MountPoint)
		}
		if lerr := luks2.Lock(v.Mapping); lerr != nil {
			m.stale = append(m.stale, v)
			if err == nil {
				err = lerr
			}
		}
		return err
	}
	return fmt.Errorf("no open volume %s", uuid)
}

// CloseReport says what closing the volumes did with each mapping's key.
type CloseReport struct {
	// Closed are mappings removed: their keys left the kernel with them.
	Closed []string `json:"closed,omitempty"`
	// KeyDropped are mappings something still held open: their crypt
	// table was replaced by a linear view of the ciphertext, so the key
	// left the kernel even though the device node remains.
	KeyDropped []string `json:"key_dropped,omitempty"`
	// KeyRemains are mappings whose key is still in the kernel.
	KeyRemains []string `json:"key_remains,omitempty"`
}

// AllKeysGone reports whether no mapping's key is left in the kernel.
func (r CloseReport) AllKeysGone() bool { return len(r.KeyRemains) == 0 }

// CloseAll unmounts every volume (detaching lazily what is busy), closes
// its mapping, retrying while the detached filesystem lets go, and drops
// the key in place of any mapping still held open. The report says, per
// mapping, whether its key left the kernel; the error joins what failed.
func (m *Manager) CloseAll() (CloseReport, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var rep CloseReport
	var errs []error
	all := append(m.open, m.stale...)
	for _, v := range m.open {
		if err := fs.Unmount(v.MountPoint); err != nil {
			if derr := fs.Detach(v.MountPoint); derr != nil {
				errs = append(errs, err, derr)
			}
		}
	}
	m.open, m.stale = nil, nil
	pending := all
	for try := 0; len(pending) > 0 && try < closeRetries; try++ {
		if try > 0 {
			time.Sleep(retryDelay)
		}
		var still []Volume
		for _, v := range pending {
			if err := luks2.Lock(v.Mapping); err != nil {
				still = append(still, v)
				continue
			}
			rep.Closed = append(rep.Closed, v.Mapping)
		}
		pending = still
	}
	for _, v := range pending {
		if err := luks2.DropKey(v.Mapping, v.Device); err != nil {
			rep.KeyRemains = append(rep.KeyRemains, v.Mapping)
			errs = append(errs, err)
			m.stale = append(m.stale, v)
			continue
		}
		rep.KeyDropped = append(rep.KeyDropped, v.Mapping)
		m.Log.Warn("mapping still held open: key dropped in place", "mapping", v.Mapping, "disk", v.Disk)
	}
	return rep, errors.Join(errs...)
}

// ReleaseStale retries closing the mappings of failed disks that were
// still busy, so their keys leave the kernel as soon as possible.
func (m *Manager) ReleaseStale() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	var still []Volume
	var firstErr error
	for _, v := range m.stale {
		if err := luks2.Lock(v.Mapping); err != nil {
			still = append(still, v)
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		m.Log.Info("mapping of a failed disk closed", "mapping", v.Mapping)
	}
	m.stale = still
	return firstErr
}

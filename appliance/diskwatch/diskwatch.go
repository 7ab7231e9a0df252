// Package diskwatch keeps the appliance's store in step with its hardware
// while it serves: a disk whose device vanished is failed and its volume
// closed; a blank disk is reported and, once the operators approved it,
// provisioned, added to the store and resynced. It also runs the periodic
// scrub and reports the disks for health.
package diskwatch

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/appliance/store"
	"github.com/dataembassy/embassy/appliance/volumes"
	"github.com/dataembassy/embassy/disks/discover"
	"github.com/dataembassy/embassy/protocol/api"
)

// Store is what the watcher needs of the mirrored store.
type Store interface {
	Status() (disks []store.DiskStatus, degraded bool)
	MarkFailed(id, reason string)
	AddDisk(spec store.DiskSpec) error
	RemoveDisk(id string) error
	Resync(ctx context.Context, id string, progress func(store.Progress)) (*store.ScrubReport, error)
	Scrub(ctx context.Context, progress func(store.Progress)) (*store.ScrubReport, error)
}

// Volumes is what the watcher needs of the open data volumes.
type Volumes interface {
	Volumes() []volumes.Volume
	Close(uuid string) error
	ReleaseStale() error
}

// Config is the watcher's hardware and actions.
type Config struct {
	Log *slog.Logger
	// SysBlock lists the kernel's block devices (normally /sys/block);
	// DevDir holds their nodes (normally /dev).
	SysBlock, DevDir string
	// List classifies the disks under SysBlock and DevDir (discover.List if
	// nil). It reads the disks, so it is called only when the set of block
	// devices changed.
	List        func(sysBlock, devDir string) ([]discover.Disk, error)
	ApplianceID string
	Store       Store
	Volumes     Volumes
	// Provision provisions an approved blank disk (attesting to every
	// broker, depositing its shares) and opens it. It returns the new
	// volume and the disk approvals the brokers count after this one.
	Provision func(ctx context.Context, d discover.Disk) (v volumes.Volume, approvalsLeft int, ok bool)
	// Peers reports the replication lag for health (none if nil).
	Peers func() []api.PeerHealth
	// Refused are our disks that are present but not used (header
	// refused), reported by serial with the store's failed state.
	Refused []volumes.Volume
	// Approvals is the number of disk approvals every broker agrees on, as
	// of the last attestation; SetApprovals updates it.
	Approvals int
}

// Watcher watches the disks. Its methods may be called concurrently, but
// Check only from one goroutine (Run's).
type Watcher struct {
	c         Config
	approvals atomic.Int64

	mu        sync.Mutex
	serials   map[string]volumes.Volume // by LUKS UUID, kept after close
	blank     []api.DiskHealth          // reported
	announced map[string]bool

	// Owned by Check: the block devices last probed and the blank disks
	// among them.
	devices    string
	blankFound []discover.Disk
}

// New makes a watcher over the volumes open now.
func New(c Config) *Watcher {
	if c.List == nil {
		c.List = discover.List
	}
	w := &Watcher{c: c, serials: map[string]volumes.Volume{}, announced: map[string]bool{}}
	for _, v := range append(c.Volumes.Volumes(), c.Refused...) {
		w.serials[v.UUID] = v
	}
	w.approvals.Store(int64(c.Approvals))
	return w
}

// SetApprovals records the disk approvals of the latest attestation.
func (w *Watcher) SetApprovals(n int) { w.approvals.Store(int64(n)) }

// Run checks the disks every interval until ctx ends.
func (w *Watcher) Run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for ctx.Err() == nil {
		select {
		case <-ctx.Done():
		case <-t.C:
			w.Check(ctx)
		}
	}
}

// Check makes one pass: fail vanished disks, close failed disks' volumes,
// report blank disks and provision one if the brokers approved it.
func (w *Watcher) Check(ctx context.Context) {
	// A pulled disk: its block device is gone.
	for _, v := range w.c.Volumes.Volumes() {
		if _, err := os.Stat(filepath.Join(w.c.SysBlock, v.Disk)); err != nil {
			w.c.Store.MarkFailed(v.UUID, "disk removed")
		}
	}
	// A failed disk (pulled, or failed by the store on an I/O error): its
	// volume is closed once, and it is reported by serial for the ticket.
	disks, _ := w.c.Store.Status()
	for _, d := range disks {
		if d.State != store.Failed {
			continue
		}
		for _, v := range w.c.Volumes.Volumes() {
			if v.UUID == d.ID {
				action := "volume closed; replace the disk"
				if err := w.c.Volumes.Close(v.UUID); err != nil {
					// A filesystem whose disk vanished stays busy until it is
					// released; it is detached and its mapping goes at the
					// next lockdown or reboot.
					w.c.Log.Warn("closing the failed disk's volume", "serial", v.Serial, "err", err.Error())
					action = "volume detached; replace the disk"
				}
				w.c.Log.Error(logmsg.MsgDiskFailed, "serial", v.Serial, "device", v.Disk, "uuid", v.UUID, "reason", d.Reason, "action", action)
			}
		}
	}

	w.c.Volumes.ReleaseStale() // fails quietly while the detached filesystem is busy

	blank, ok := w.blankDisks()
	if !ok || len(blank) == 0 || w.approvals.Load() <= 0 {
		return
	}
	// Whatever comes of it, the disk is classified anew next time.
	w.devices = ""
	v, left, ok := w.c.Provision(ctx, blank[0])
	if !ok {
		return
	}
	// The deposit used one approval on every broker; until the next
	// attestation says so, count it here.
	w.approvals.Store(int64(left))
	w.mu.Lock()
	w.serials[v.UUID] = v
	w.mu.Unlock()
	w.AddAndResync(ctx, v)
}

// ScrubLoop reads back every copy of every object, first after a short
// delay (so a reboot after a media problem finds it soon) and then
// periodically. Bad copies are rewritten from a good one (the new copy is
// written to new blocks), or fetched from a peer when no local copy is good.
func (w *Watcher) ScrubLoop(ctx context.Context, first, every time.Duration) {
	wait := first
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = every
		if _, err := w.c.Store.Scrub(ctx, func(p store.Progress) {
			w.c.Log.Info("scrub progress", "done", p.Done, "total", p.Total, "bytes", p.Bytes)
		}); err != nil && ctx.Err() == nil {
			w.c.Log.Error("scrub", "err", err.Error())
		}
	}
}

// blankDisks returns the blank disks. Disks are probed again only when the
// kernel's set of block devices changed (or after a provisioning attempt),
// not on every pass: the data disks are not read for nothing.
func (w *Watcher) blankDisks() ([]discover.Disk, bool) {
	ents, err := os.ReadDir(w.c.SysBlock)
	if err != nil {
		w.c.Log.Warn("disk discovery failed", "err", err.Error())
		return nil, false
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if devices := strings.Join(names, " "); devices != w.devices {
		found, err := w.c.List(w.c.SysBlock, w.c.DevDir)
		if err != nil {
			w.c.Log.Warn("disk discovery failed", "err", err.Error())
			return nil, false
		}
		w.devices = devices
		w.blankFound = w.blankFound[:0]
		var report []api.DiskHealth
		for _, d := range found {
			if d.Kind != discover.Blank {
				continue
			}
			w.blankFound = append(w.blankFound, d)
			report = append(report, api.DiskHealth{Serial: d.Serial, Device: d.Name, State: "blank, waiting for approval"})
			if !w.announced[d.Name+d.Serial] {
				w.announced[d.Name+d.Serial] = true
				w.c.Log.Info(logmsg.MsgBlankDisk, "serial", d.Serial, "device", d.Name, "size", d.Size, "appliance_id", w.c.ApplianceID)
			}
		}
		w.mu.Lock()
		w.blank = report
		w.mu.Unlock()
	}
	return w.blankFound, true
}

// AddAndResync adds a new volume to the store as syncing, copies every
// object onto it with progress, and then forgets the failed disks it
// replaces.
func (w *Watcher) AddAndResync(ctx context.Context, v volumes.Volume) {
	if err := w.c.Store.AddDisk(store.DiskSpec{ID: v.UUID, Root: filepath.Join(v.MountPoint, "store")}); err != nil {
		w.c.Log.Error("adding disk to the store", "serial", v.Serial, "err", err.Error())
		return
	}
	rep, err := w.c.Store.Resync(ctx, v.UUID, func(p store.Progress) {
		w.c.Log.Info(logmsg.MsgResync, "serial", v.Serial, "done", p.Done, "total", p.Total, "bytes", p.Bytes, "elapsed_ms", p.Elapsed.Milliseconds())
	})
	if err != nil {
		w.c.Log.Error("resync failed", "serial", v.Serial, "err", err.Error())
		return
	}
	disks, _ := w.c.Store.Status()
	for _, d := range disks {
		if d.State == store.Failed {
			if err := w.c.Store.RemoveDisk(d.ID); err == nil {
				w.c.Log.Info("failed disk retired", "serial", w.serialOf(d.ID), "uuid", d.ID)
			}
		}
	}
	_, degraded := w.c.Store.Status()
	w.c.Log.Info(logmsg.MsgDiskHealthy, "serial", v.Serial, "objects", rep.Objects, "copied", rep.Healed, "bytes", rep.Bytes, "degraded", degraded)
	// Read every copy back once, the new disk's included.
	if _, err := w.c.Store.Scrub(ctx, nil); err != nil {
		w.c.Log.Error("scrub after resync", "err", err.Error())
	}
}

func (w *Watcher) serialOf(uuid string) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.serials[uuid].Serial
}

// Health is the appliance's report: disks by serial, blank disks, lag.
func (w *Watcher) Health() *api.Health {
	disks, degraded := w.c.Store.Status()
	h := &api.Health{Degraded: degraded}
	w.mu.Lock()
	for _, d := range disks {
		v := w.serials[d.ID]
		h.Disks = append(h.Disks, api.DiskHealth{Serial: v.Serial, Device: v.Disk, UUID: d.ID, State: string(d.State), Reason: d.Reason,
			ReadErrors: d.ReadErrors, Healed: d.Healed})
	}
	h.BlankDisks = append(h.BlankDisks, w.blank...)
	w.mu.Unlock()
	if w.c.Peers != nil {
		h.Peers = w.c.Peers()
	}
	return h
}

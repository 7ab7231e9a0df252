package initseq

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/appliance/config"
	"github.com/dataembassy/embassy/appliance/store"
	"github.com/dataembassy/embassy/appliance/volumes"
	"github.com/dataembassy/embassy/disks/discover"
	"github.com/dataembassy/embassy/protocol/api"
)

// Log messages of the disk replacement workflow.
const (
	MsgDiskFailed  = "disk failed"
	MsgBlankDisk   = "blank disk waiting for approval"
	MsgResync      = "resync progress"
	MsgDiskHealthy = "replacement disk resynced; store healthy"
)

// diskWatcher keeps the store in step with the hardware while serving: a
// disk whose device vanished is failed and its volume closed; a blank disk
// is reported and, once an operator approved it, provisioned, added to the
// store and resynced.
type diskWatcher struct {
	log *slog.Logger
	ac  *attest.Client
	cfg *config.Config
	vm  *volumes.Manager
	st  *store.Store

	// latest are the last attestation results (disk approvals).
	latest atomic.Pointer[[]*attest.Result]

	mu        sync.Mutex
	serials   map[string]volumes.Volume // by LUKS UUID, kept after close
	blank     []api.DiskHealth          // reported
	announced map[string]bool

	// Owned by the watcher's loop: the block devices last probed and the
	// blank disks among them.
	devices    string
	blankFound []discover.Disk
}

func newDiskWatcher(log *slog.Logger, ac *attest.Client, cfg *config.Config, vm *volumes.Manager, st *store.Store, results []*attest.Result) *diskWatcher {
	w := &diskWatcher{log: log, ac: ac, cfg: cfg, vm: vm, st: st, serials: map[string]volumes.Volume{}, announced: map[string]bool{}}
	for _, v := range vm.Volumes() {
		w.serials[v.UUID] = v
	}
	w.latest.Store(&results)
	return w
}

func (w *diskWatcher) run(ctx context.Context) {
	t := time.NewTicker(3 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		w.check(ctx)
	}
}

func (w *diskWatcher) check(ctx context.Context) {
	// A pulled disk: its block device is gone.
	for _, v := range w.vm.Volumes() {
		if _, err := os.Stat(filepath.Join("/sys/block", v.Disk)); err != nil {
			w.st.MarkFailed(v.UUID, "disk removed")
		}
	}
	// A failed disk (pulled, or failed by the store on an I/O error): its
	// volume is closed once, and it is reported by serial for the ticket.
	disks, _ := w.st.Status()
	for _, d := range disks {
		if d.State != store.Failed {
			continue
		}
		for _, v := range w.vm.Volumes() {
			if v.UUID == d.ID {
				action := "volume closed; replace the disk"
				if err := w.vm.Close(v.UUID); err != nil {
					// A filesystem whose disk vanished stays busy until it is
					// released; it is detached and its mapping goes at the
					// next lockdown or reboot.
					w.log.Warn("closing the failed disk's volume", "serial", v.Serial, "err", err.Error())
					action = "volume detached; replace the disk"
				}
				w.log.Error(MsgDiskFailed, "serial", v.Serial, "device", v.Disk, "uuid", v.UUID, "reason", d.Reason, "action", action)
			}
		}
	}

	w.vm.ReleaseStale() // fails quietly while the detached filesystem is busy

	blank, ok := w.blankDisks()
	if !ok || len(blank) == 0 || approvals(*w.latest.Load()) == 0 {
		return
	}
	// Whatever comes of it, the disk is classified anew next time.
	w.devices = ""
	all, err := w.ac.AttestAll(ctx, attest.Backoff{Initial: time.Second, Max: 5 * time.Second}, len(w.cfg.Brokers))
	if err != nil {
		w.log.Warn("provisioning needs all brokers", "err", err.Error())
		return
	}
	v, ok := provisionDisk(ctx, w.log, w.ac, all, blank[0], w.vm)
	if !ok {
		return
	}
	// The deposit used one approval on every broker; until the next
	// attestation says so, count it here.
	used := make([]*attest.Result, len(all))
	for i, r := range all {
		c := *r
		c.DiskApprovals--
		used[i] = &c
	}
	w.latest.Store(&used)
	w.mu.Lock()
	w.serials[v.UUID] = v
	w.mu.Unlock()
	w.addAndResync(ctx, v)
}

// scrubLoop reads back every copy of every object, first after a short
// delay (so a reboot after a media problem finds it soon) and then
// periodically. Bad copies are rewritten from a good one (the new copy is
// written to new blocks), or fetched from a peer when no local copy is good.
func (w *diskWatcher) scrubLoop(ctx context.Context, first, every time.Duration) {
	wait := first
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = every
		if _, err := w.st.Scrub(ctx, func(p store.Progress) {
			w.log.Info("scrub progress", "done", p.Done, "total", p.Total, "bytes", p.Bytes)
		}); err != nil && ctx.Err() == nil {
			w.log.Error("scrub", "err", err.Error())
		}
	}
}

// blankDisks returns the blank disks. Disks are probed again only when the
// kernel's set of block devices changed (or after a provisioning attempt),
// not on every pass: the data disks are not read for nothing.
func (w *diskWatcher) blankDisks() ([]discover.Disk, bool) {
	ents, err := os.ReadDir("/sys/block")
	if err != nil {
		w.log.Warn("disk discovery failed", "err", err.Error())
		return nil, false
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if devices := strings.Join(names, " "); devices != w.devices {
		found, err := discover.List("/sys/block", "/dev")
		if err != nil {
			w.log.Warn("disk discovery failed", "err", err.Error())
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
				w.log.Info(MsgBlankDisk, "serial", d.Serial, "device", d.Name, "size", d.Size, "appliance_id", w.ac.ID())
			}
		}
		w.mu.Lock()
		w.blank = report
		w.mu.Unlock()
	}
	return w.blankFound, true
}

// addAndResync adds a new volume to the store as syncing, copies every
// object onto it with progress, and then forgets the failed disks it
// replaces.
func (w *diskWatcher) addAndResync(ctx context.Context, v volumes.Volume) {
	if err := w.st.AddDisk(store.DiskSpec{ID: v.UUID, Root: filepath.Join(v.MountPoint, "store")}); err != nil {
		w.log.Error("adding disk to the store", "serial", v.Serial, "err", err.Error())
		return
	}
	rep, err := w.st.Resync(ctx, v.UUID, func(p store.Progress) {
		w.log.Info(MsgResync, "serial", v.Serial, "done", p.Done, "total", p.Total, "bytes", p.Bytes, "elapsed_ms", p.Elapsed.Milliseconds())
	})
	if err != nil {
		w.log.Error("resync failed", "serial", v.Serial, "err", err.Error())
		return
	}
	disks, _ := w.st.Status()
	for _, d := range disks {
		if d.State == store.Failed {
			if err := w.st.RemoveDisk(d.ID); err == nil {
				w.log.Info("failed disk retired", "serial", w.serialOf(d.ID), "uuid", d.ID)
			}
		}
	}
	_, degraded := w.st.Status()
	w.log.Info(MsgDiskHealthy, "serial", v.Serial, "objects", rep.Objects, "copied", rep.Healed, "bytes", rep.Bytes, "degraded", degraded)
	// Read every copy back once, the new disk's included.
	if _, err := w.st.Scrub(ctx, nil); err != nil {
		w.log.Error("scrub after resync", "err", err.Error())
	}
}

func (w *diskWatcher) serialOf(uuid string) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.serials[uuid].Serial
}

// health is the appliance's report: disks by serial, blank disks, lag.
func (w *diskWatcher) health(lag func() []api.PeerHealth) *api.Health {
	disks, degraded := w.st.Status()
	h := &api.Health{Degraded: degraded}
	w.mu.Lock()
	for _, d := range disks {
		v := w.serials[d.ID]
		h.Disks = append(h.Disks, api.DiskHealth{Serial: v.Serial, Device: v.Disk, UUID: d.ID, State: string(d.State), Reason: d.Reason,
			ReadErrors: d.ReadErrors, Healed: d.Healed})
	}
	h.BlankDisks = append(h.BlankDisks, w.blank...)
	w.mu.Unlock()
	if lag != nil {
		h.Peers = lag()
	}
	return h
}

// approvals is the number of disk approvals every broker agrees on.
func approvals(results []*attest.Result) int {
	if len(results) == 0 {
		return 0
	}
	n := results[0].DiskApprovals
	for _, r := range results {
		n = min(n, r.DiskApprovals)
	}
	return n
}

package initseq

import (
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/appliance/upgrade"
	"github.com/dataembassy/embassy/disks/discover"
	"github.com/dataembassy/embassy/images/measure"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/eventlog"
)

// trialBoot is what this boot knows about the boot disk's slots: which
// disk it is, the UKI digest the firmware measured for this boot, and
// whether that is the trial slot's image rather than slot A's (a boot
// through BootNext).
type trialBoot struct {
	disk   upgrade.Disk
	booted [32]byte
	// trial is true until the trial image is committed to slot A.
	trial atomic.Bool
}

// findBootDisk finds the boot disk laid out as embassy.img that holds the
// running UKI (booted: the PCR4 digest of this boot) in one of its slots.
func findBootDisk(booted [32]byte) (*trialBoot, error) {
	found, err := discover.List(sysBlock, devDir)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, d := range found {
		if d.Kind != discover.Boot {
			continue
		}
		disk := upgrade.Disk{Path: d.Path}
		inA, errA := slotHolds(disk, upgrade.SlotA, booted)
		inB, errB := slotHolds(disk, upgrade.SlotB, booted)
		if inA || inB {
			tb := &trialBoot{disk: disk, booted: booted}
			tb.trial.Store(inB && !inA)
			return tb, nil
		}
		errs = append(errs, fmt.Errorf("%s: slot A: %v; slot B: %v", d.Path, errA, errB))
	}
	return nil, fmt.Errorf("no boot disk holds the running image: %w", errors.Join(errs...))
}

// slotHolds reports whether slot holds the UKI whose PCR4 digest is booted.
func slotHolds(d upgrade.Disk, slot upgrade.Slot, booted [32]byte) (bool, error) {
	uki, err := d.ReadSlot(slot)
	if err != nil {
		return false, err
	}
	got, err := measure.Authenticode(uki)
	return err == nil && got == booted, err
}

// bootedUKI returns the Authenticode digest the firmware measured into
// PCR4 for the UKI it started (the last EV_EFI_BOOT_SERVICES_APPLICATION
// event of PCR4), from a log that replays to the PCRs.
func bootedUKI(evlog []byte, pcrs map[int][]byte) ([32]byte, error) {
	var d [32]byte
	events, err := eventlog.Replay(evlog, pcrs)
	if err != nil {
		return d, err
	}
	found := false
	for _, e := range events {
		if e.PCR == 4 && e.Type == "EV_EFI_BOOT_SERVICES_APPLICATION" {
			b, err := hex.DecodeString(e.Digest)
			if err != nil || len(b) != len(d) {
				return d, fmt.Errorf("PCR4 event digest %q", e.Digest)
			}
			copy(d[:], b)
			found = true
		}
	}
	if !found {
		return d, errors.New("no UKI measured into PCR4")
	}
	return d, nil
}

// upgrader takes pushed images (api.PathUpgrade): one at a time, each
// checked, approved by k brokers, written to the trial slot and made the
// next boot; then it asks the serve loop to stop at a quiet moment.
type upgrader struct {
	log     *slog.Logger
	ac      *attest.Client
	k       int
	pub     ed25519.PublicKey
	running uint64
	boot    *trialBoot
	// bootNext makes the trial slot the firmware's next boot, once.
	bootNext func() error

	busy    sync.Mutex
	pending atomic.Uint64
	once    sync.Once
	ready   chan struct{} // closed once an image is staged
}

func newUpgrader(log *slog.Logger, ac *attest.Client, k int, pub ed25519.PublicKey, running uint64, boot *trialBoot, bootNext func() error) *upgrader {
	return &upgrader{log: log, ac: ac, k: k, pub: pub, running: running, boot: boot, bootNext: bootNext, ready: make(chan struct{})}
}

// Ready is closed once an image is staged and the appliance should reboot.
func (u *upgrader) Ready() <-chan struct{} { return u.ready }

// Health is the upgrade part of the health report.
func (u *upgrader) Health() *api.UpgradeHealth {
	h := &api.UpgradeHealth{Running: u.running, Pending: u.pending.Load(), Trial: u.boot.trial.Load()}
	if h.Pending != 0 {
		h.State = "staged"
	}
	return h
}

func (u *upgrader) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	resp := api.UpgradeResponse{ApplianceID: u.ac.ID(), Running: u.running, State: "refused"}
	status, err := u.serve(r, &resp)
	if err != nil {
		resp.Error = err.Error()
		u.log.Warn(logmsg.MsgUpgradeRefused, "remote", r.RemoteAddr, "reason", err.Error())
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(resp)
}

func (u *upgrader) serve(r *http.Request, resp *api.UpgradeResponse) (int, error) {
	if r.Method != http.MethodPut {
		return http.StatusMethodNotAllowed, errors.New("use PUT")
	}
	if u.boot == nil {
		return http.StatusServiceUnavailable, errors.New("this appliance did not find its boot disk at boot; it cannot be upgraded in place")
	}
	if !u.busy.TryLock() {
		return http.StatusConflict, errors.New("another upgrade is being staged")
	}
	defer u.busy.Unlock()
	if p := u.pending.Load(); p != 0 {
		return http.StatusConflict, fmt.Errorf("version %d is staged already; the appliance reboots into it", p)
	}
	if r.ContentLength <= 0 || r.ContentLength > api.MaxUpgradeUKI {
		return http.StatusRequestEntityTooLarge, fmt.Errorf("the UKI needs a Content-Length of 1 to %d bytes", api.MaxUpgradeUKI)
	}
	man, err1 := base64.StdEncoding.DecodeString(r.Header.Get(api.HeaderUpgradeManifest))
	sig, err2 := base64.StdEncoding.DecodeString(r.Header.Get(api.HeaderUpgradeSignature))
	if err1 != nil || err2 != nil || len(man) == 0 || len(sig) == 0 {
		return http.StatusBadRequest, fmt.Errorf("the %s and %s headers must carry the manifest and its signature in base64", api.HeaderUpgradeManifest, api.HeaderUpgradeSignature)
	}
	uki := make([]byte, r.ContentLength)
	if _, err := io.ReadFull(r.Body, uki); err != nil {
		return http.StatusBadRequest, fmt.Errorf("read UKI: %w", err)
	}
	img, err := upgrade.Check(man, sig, uki, u.pub, u.running)
	if err != nil {
		return http.StatusUnprocessableEntity, err
	}
	// k brokers must list the image as approved, in a round asked now.
	ctx, cancel := context.WithTimeout(r.Context(), time.Minute)
	round, err := u.ac.AttestAll(ctx, attest.Backoff{Initial: time.Second, Max: 5 * time.Second}, u.k)
	cancel()
	attest.Round(round).WipeShares()
	if err != nil {
		return http.StatusServiceUnavailable, fmt.Errorf("asking the brokers: %w", err)
	}
	resp.ApprovedAt = approvedAt(round, img)
	if len(resp.ApprovedAt) < u.k {
		return http.StatusConflict, fmt.Errorf("image %d is approved at %d brokers (%s), %d needed",
			img.Manifest.Version, len(resp.ApprovedAt), strings.Join(resp.ApprovedAt, ", "), u.k)
	}
	if err := u.boot.disk.WriteSlot(upgrade.SlotB, img.UKI); err != nil {
		return http.StatusInternalServerError, fmt.Errorf("write the trial slot: %w", err)
	}
	if err := u.bootNext(); err != nil {
		return http.StatusInternalServerError, fmt.Errorf("make the trial slot the next boot: %w", err)
	}
	u.pending.Store(img.Manifest.Version)
	resp.Staged, resp.State = img.Manifest.Version, "staged"
	u.log.Info(logmsg.MsgUpgradeStaged, "version", img.Manifest.Version, "approved_at", resp.ApprovedAt)
	u.once.Do(func() { close(u.ready) })
	return http.StatusAccepted, nil
}

// approvedAt lists the brokers of round that list img as approved.
func approvedAt(round []*attest.Result, img *upgrade.Image) []string {
	var out []string
	for _, res := range round {
		for _, a := range res.Approved {
			if a.Version == img.Manifest.Version && a.UKIAuthenticode == img.Manifest.Measurements.UKIAuthenticode {
				out = append(out, res.Broker)
				break
			}
		}
	}
	return out
}

// upgrades is what the boot knows for in-place upgrades; slots or pub nil
// means upgrades are unavailable on this boot.
type upgrades struct {
	trialTimeout time.Duration
	slots        *trialBoot
	pub          ed25519.PublicKey
	running      uint64
}

// trialDeadline is when a trial boot gives up attesting (zero: this boot
// is not a trial).
func (u *upgrades) trialDeadline(start time.Time) time.Time {
	if u.slots == nil || !u.slots.trial.Load() {
		return time.Time{}
	}
	return start.Add(u.trialTimeout)
}

// commit makes a trial image that attested, opened its disks and serves
// the default boot: slot B is made the next boot first, so a power cut
// while slot A is written boots the trial image again, which commits
// again; then slot A is written and the one-shot boot cleared. Only then
// does the health report say the image is committed, and only then do
// the brokers raise the floor. A commit that fails is tried again at the
// next re-attestation.
func (u *upgrades) commit(log *slog.Logger) {
	if u.slots == nil || !u.slots.trial.Load() {
		return
	}
	if err := setTrialNext(); err != nil {
		log.Error("commit: make the trial slot the next boot", "err", err.Error())
		return
	}
	changed, err := u.slots.disk.Commit(u.slots.booted)
	if err != nil {
		log.Error("commit: write slot A", "err", err.Error())
		return
	}
	if err := clearBootNext(); err != nil {
		log.Warn("commit: clear the one-shot boot", "err", err.Error())
	}
	u.slots.trial.Store(false)
	log.Info(logmsg.MsgUpgradeCommitted, "version", u.running, "slot_a_written", changed)
}

// newUpgrader returns the handler of pushed images, or nil if this boot
// cannot upgrade in place.
func (u *upgrades) newUpgrader(log *slog.Logger, ac *attest.Client, k int) *upgrader {
	if u.slots == nil || len(u.pub) != ed25519.PublicKeySize {
		return nil
	}
	return newUpgrader(log, ac, k, u.pub, u.running, u.slots, setTrialNext)
}

// lagger reports replication lag.
type lagger interface{ Lag() []api.PeerHealth }

// waitReplicated waits until no peer lacks anything, for at most limit.
func waitReplicated(ctx context.Context, log *slog.Logger, rep lagger, limit time.Duration) {
	deadline := time.Now().Add(limit)
	for {
		pending := int64(0)
		for _, p := range rep.Lag() {
			pending += p.PendingBytes + int64(p.PendingObjects)
		}
		if pending == 0 {
			return
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			log.Warn("rebooting with replication still pending (queued again after the reboot)", "pending", pending)
			return
		}
		time.Sleep(time.Second)
	}
}

// rebootNow flushes the file systems and restarts the machine; it returns
// only if the kernel refused.
func rebootNow(log *slog.Logger) {
	syscall.Sync()
	if err := syscall.Reboot(syscall.LINUX_REBOOT_CMD_RESTART); err != nil {
		log.Error("reboot", "err", err.Error())
	}
}

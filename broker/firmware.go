package broker

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	pb "github.com/google/go-tpm-tools/proto/tpm"

	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/eventlog"
	"github.com/dataembassy/embassy/tpm/pcrs"
	"github.com/dataembassy/embassy/tpm/verifier"
)

// firmware is a platform measurement: the values of the platform PCRs
// (pcrs.Platform) and their replayed events, as recorded at activation
// (the reference) or from a boot refused for the firmware reason (pending).
type firmware struct {
	PCRs     map[int][]byte   `json:"pcrs"`
	Events   []eventlog.Event `json:"events"`
	Recorded int64            `json:"recorded_unix"`
}

// Bounds of what is kept and reported of a platform measurement.
const (
	maxInfo        = 64   // characters of an event's description
	maxDetail      = 1024 // characters of a refusal's or approval's detail
	maxStatusLines = 64   // differences listed in the state
	maxEvents      = 1024 // platform events kept of one measurement
)

// platformOf keeps the platform PCRs' values and events of a verified
// quote and its replayed event log.
func platformOf(values map[int][]byte, events []eventlog.Event, now time.Time) *firmware {
	fw := &firmware{PCRs: map[int][]byte{}, Recorded: now.Unix()}
	for _, i := range pcrs.Platform() {
		fw.PCRs[i] = bytes.Clone(values[i])
	}
	for _, e := range events {
		if !pcrs.IsPlatform(e.PCR) {
			continue
		}
		if r := []rune(e.Info); len(r) > maxInfo {
			e.Info = string(r[:maxInfo]) + "…"
		}
		if len(fw.Events) == maxEvents {
			// The PCR values still decide; beyond this many events the
			// record says only that there were more.
			fw.Events = append(fw.Events, eventlog.Event{PCR: e.PCR, Type: "…", Info: "more events not kept"})
			break
		}
		fw.Events = append(fw.Events, e)
	}
	return fw
}

// activationEvidence verifies the platform evidence sent with an
// activation answer (the quote by the AK being activated, bound to the
// activation secret, and the event log) and returns the platform
// measurement it establishes.
func activationEvidence(ak *verifier.AK, req *api.ActivateRequest, now time.Time) (*firmware, error) {
	if len(req.Quote) == 0 || len(req.Signature) == 0 || len(req.EventLog) == 0 {
		return nil, reject(http.StatusForbidden, ReasonActivationEvidence, "no quote and event log")
	}
	if err := pcrs.Check(req.PCRs); err != nil {
		return nil, reject(http.StatusForbidden, ReasonActivationEvidence, err.Error())
	}
	q := &pb.Quote{Quote: req.Quote, RawSig: req.Signature, Pcrs: pcrs.Proto(req.PCRs)}
	info, err := verifier.VerifyQuote(ak, q, api.ActivationExtraData(req.Secret))
	if err != nil {
		return nil, reject(http.StatusForbidden, ReasonActivationEvidence, err.Error())
	}
	events, err := eventlog.Replay(req.EventLog, info.PCRs)
	if err != nil {
		return nil, reject(http.StatusForbidden, ReasonActivationEvidence, err.Error())
	}
	return platformOf(info.PCRs, events, now), nil
}

// checkFirmware compares a verified boot's platform PCRs with the
// appliance's reference. On a difference, or without a reference, it
// keeps the boot's measurement as the appliance's pending firmware (unless
// one is pending already: what an operator reviews is what
// approve-firmware adopts) and returns the refusal, whose detail names the
// differing PCRs and events. The caller holds the appliance's lock.
func (b *Broker) checkFirmware(r *record, values map[int][]byte, events []eventlog.Event, detail map[string]string) error {
	got := platformOf(values, events, b.now())
	changed, lines := diffFirmware(r.Firmware, got)
	if len(changed) == 0 {
		return nil
	}
	detail["firmware_pcrs"] = joinInts(changed)
	if err := b.keepPendingFirmware(r, got); err != nil {
		return err
	}
	return reject(http.StatusForbidden, ReasonFirmware, bounded(lines, maxDetail))
}

// keepPendingFirmware records fw as the appliance's pending firmware
// unless one is pending or the appliance is revoked. The caller holds the
// appliance's lock and r is its record as read under it.
func (b *Broker) keepPendingFirmware(r *record, fw *firmware) error {
	if r.Revoked || r.PendingFirmware != nil {
		return nil
	}
	kept := *r
	kept.PendingFirmware = fw
	return b.save(&kept)
}

// ApproveFirmware adopts the appliance's pending firmware (the platform
// measurement of the boot refused for the firmware reason) as its new
// reference (operator action), if its digest (api.FirmwareDigest, shown
// in the state) is the one the operator reviewed: someone in the cage
// cannot swap in another measurement between review and approval. It is
// refused when nothing is pending (ReasonNoPendingFirmware), when the
// digest differs (ReasonFirmwareDigest) and for a revoked appliance. The
// audit entry lists each changed PCR with its old and new value.
func (b *Broker) ApproveFirmware(by audit.Actor, id, digest string) (err error) {
	detail := map[string]string{"digest": bounded([]string{digest}, 64)}
	defer func() { b.record(by, "approve-firmware", id, err, detail) }()
	return b.update(id, func(r *record) error {
		if r.Revoked {
			return reject(http.StatusConflict, ReasonRevoked, "a revoked appliance gets no firmware approval")
		}
		if r.PendingFirmware == nil {
			return reject(http.StatusConflict, ReasonNoPendingFirmware, "")
		}
		if pending := r.PendingFirmware.digest(); digest != pending {
			return reject(http.StatusConflict, ReasonFirmwareDigest, "pending "+pending)
		}
		changed, lines := diffFirmware(r.Firmware, r.PendingFirmware)
		for _, i := range changed {
			old := "none"
			if r.Firmware != nil {
				old = hex.EncodeToString(r.Firmware.PCRs[i])
			}
			detail["pcr"+strconv.Itoa(i)] = old + " -> " + hex.EncodeToString(r.PendingFirmware.PCRs[i])
		}
		detail["changed_pcrs"] = joinInts(changed)
		if len(lines) > 0 {
			detail["events"] = bounded(lines, maxDetail)
		}
		r.Firmware, r.PendingFirmware = r.PendingFirmware, nil
		return nil
	})
}

// RejectFirmware discards the appliance's pending firmware (operator
// action), so that a later refused boot can be reviewed instead: a
// measurement planted by someone in the cage need not be approved to go
// away. Refused when nothing is pending or the digest differs.
func (b *Broker) RejectFirmware(by audit.Actor, id, digest string) (err error) {
	detail := map[string]string{"digest": bounded([]string{digest}, 64)}
	defer func() { b.record(by, "reject-firmware", id, err, detail) }()
	return b.update(id, func(r *record) error {
		if r.PendingFirmware == nil {
			return reject(http.StatusConflict, ReasonNoPendingFirmware, "")
		}
		if pending := r.PendingFirmware.digest(); digest != pending {
			return reject(http.StatusConflict, ReasonFirmwareDigest, "pending "+pending)
		}
		r.PendingFirmware = nil
		return nil
	})
}

// digest names the measurement (api.FirmwareDigest).
func (fw *firmware) digest() string { return api.FirmwareDigest(pcrs.Platform(), fw.PCRs) }

// pendingFirmware is the state's view of a record's pending firmware.
func pendingFirmware(r *record) *api.PendingFirmware {
	if r.PendingFirmware == nil {
		return nil
	}
	changed, lines := diffFirmware(r.Firmware, r.PendingFirmware)
	if len(lines) > maxStatusLines {
		lines = append(lines[:maxStatusLines:maxStatusLines], fmt.Sprintf("… %d more", len(lines)-maxStatusLines))
	}
	return &api.PendingFirmware{Recorded: time.Unix(r.PendingFirmware.Recorded, 0).UTC(), Digest: r.PendingFirmware.digest(),
		PCRs: changed, Differences: lines}
}

// diffFirmware lists the platform PCRs whose values differ between the
// reference ref (nil: none recorded, every PCR differs) and got, and for
// people how their events differ: an event whose digest changed (with its
// index among its PCR's events), events added and events missing.
func diffFirmware(ref, got *firmware) (changed []int, lines []string) {
	if ref == nil {
		lines = append(lines, "no firmware reference")
	}
	for _, i := range pcrs.Platform() {
		if ref != nil && bytes.Equal(ref.PCRs[i], got.PCRs[i]) {
			continue
		}
		changed = append(changed, i)
		var old []eventlog.Event
		if ref != nil {
			old = eventsOf(ref.Events, i)
		}
		ev := diffEvents(i, old, eventsOf(got.Events, i))
		switch {
		case len(ev) > 0:
		case ref == nil:
			ev = []string{fmt.Sprintf("PCR%d: value %s, no events", i, short(got.PCRs[i]))}
		default:
			ev = []string{fmt.Sprintf("PCR%d: value %s (was %s), events unchanged", i, short(got.PCRs[i]), short(ref.PCRs[i]))}
		}
		lines = append(lines, ev...)
	}
	return changed, lines
}

// diffEvents compares one PCR's events: the common beginning and end are
// skipped, the events between are paired in order (a changed digest), and
// what is left of either side is added or missing.
func diffEvents(pcr int, old, now []eventlog.Event) []string {
	pre := 0
	for pre < len(old) && pre < len(now) && old[pre].Digest == now[pre].Digest {
		pre++
	}
	suf := 0
	for suf < len(old)-pre && suf < len(now)-pre && old[len(old)-1-suf].Digest == now[len(now)-1-suf].Digest {
		suf++
	}
	a, b := old[pre:len(old)-suf], now[pre:len(now)-suf]
	var out []string
	for k := 0; k < max(len(a), len(b)); k++ {
		switch {
		case k < len(a) && k < len(b):
			out = append(out, fmt.Sprintf("PCR%d: event %d %s digest %s (was %s) %q", pcr, pre+k, b[k].Type, shortHex(b[k].Digest), shortHex(a[k].Digest), b[k].Info))
		case k < len(b):
			out = append(out, fmt.Sprintf("PCR%d: event %d added: %s digest %s %q", pcr, pre+k, b[k].Type, shortHex(b[k].Digest), b[k].Info))
		default:
			out = append(out, fmt.Sprintf("PCR%d: event %d missing: %s digest %s %q", pcr, pre+k, a[k].Type, shortHex(a[k].Digest), a[k].Info))
		}
	}
	return out
}

func eventsOf(events []eventlog.Event, pcr int) []eventlog.Event {
	var out []eventlog.Event
	for _, e := range events {
		if e.PCR == pcr {
			out = append(out, e)
		}
	}
	return out
}

// shortHex shortens a hex digest for people.
func shortHex(h string) string {
	if len(h) > 12 {
		return h[:12] + "…"
	}
	return h
}

func short(v []byte) string { return shortHex(hex.EncodeToString(v)) }

// bounded joins lines with "; " into at most n bytes (and a count of the
// lines left out).
func bounded(lines []string, n int) string {
	var sb strings.Builder
	for k, l := range lines {
		sep := ""
		if k > 0 {
			sep = "; "
		}
		if sb.Len()+len(sep)+len(l) > n {
			if k == 0 {
				// One line too long on its own: its start, cut.
				r := []rune(l)
				for len(string(r)) > n {
					r = r[:len(r)*3/4]
				}
				fmt.Fprintf(&sb, "%s… (%d lines)", string(r), len(lines))
				break
			}
			fmt.Fprintf(&sb, "%s… %d more", sep, len(lines)-k)
			break
		}
		sb.WriteString(sep + l)
	}
	return sb.String()
}

func joinInts(v []int) string {
	s := make([]string, len(v))
	for k, i := range v {
		s[k] = strconv.Itoa(i)
	}
	return strings.Join(s, ",")
}

// Package eventlog is the verifier's view of a TCG2 (crypto-agile) boot event
// log: it replays the log against PCR values with go-attestation and checks
// the measured-boot events of the image's PCRs (4, 7, 9, 11) against an
// image manifest.
//
// Only digests are compared. An event's type and data are not covered by its
// digest and can be forged, so they are used for display, never for a
// decision.
package eventlog

import (
	"bytes"
	"crypto"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"sort"
	"strings"
	"unicode/utf16"

	"github.com/google/go-attestation/attest"

	"github.com/dataembassy/embassy/images/manifest"
)

// MaxSize bounds an event log accepted from an appliance.
const MaxSize = 1 << 20

// Event is one replayed (verified) measurement.
type Event struct {
	PCR    int    `json:"pcr"`
	Type   string `json:"type"`   // display only: not covered by the digest
	Digest string `json:"digest"` // SHA-256, hex
	Info   string `json:"info"`   // printable rendering of the event data, display only
}

// ReplayError reports a log that does not replay to the PCR values.
type ReplayError struct{ Reason string }

func (e *ReplayError) Error() string { return "event log does not replay: " + e.Reason }

// Replay parses raw and replays every SHA-256 event against pcrs (index to
// 32-byte value). Every PCR in pcrs must replay exactly; a PCR with no event
// in the log must hold the all-zero reset value. It returns the verified
// events of the PCRs in pcrs, in log order.
func Replay(raw []byte, pcrs map[int][]byte) ([]Event, error) {
	if len(raw) == 0 || len(raw) > MaxSize {
		return nil, fmt.Errorf("event log of %d bytes: must be 1 to %d bytes", len(raw), MaxSize)
	}
	if len(pcrs) == 0 {
		return nil, &ReplayError{Reason: "no PCR values to replay against"}
	}
	el, err := attest.ParseEventLog(raw)
	if err != nil {
		return nil, fmt.Errorf("parse event log: %w", err)
	}
	var list []attest.PCR
	for i, d := range pcrs {
		if i < 0 || i > 23 || len(d) != sha256.Size {
			return nil, fmt.Errorf("PCR %d: want a SHA-256 value of index 0-23", i)
		}
		list = append(list, attest.PCR{Index: i, Digest: d, DigestAlg: crypto.SHA256})
	}
	sort.Slice(list, func(a, b int) bool { return list[a].Index < list[b].Index })
	evs, err := el.Verify(list)
	if err != nil {
		return nil, &ReplayError{Reason: err.Error()}
	}
	seen := map[int]bool{}
	out := make([]Event, 0, len(evs))
	for _, e := range evs {
		seen[e.Index] = true
		out = append(out, Event{PCR: e.Index, Type: TypeName(e.Type.String()), Digest: hex.EncodeToString(e.Digest), Info: Describe(e.Data)})
	}
	for _, p := range list {
		if !seen[p.Index] && !bytes.Equal(p.Digest, make([]byte, sha256.Size)) {
			return nil, &ReplayError{Reason: fmt.Sprintf("PCR %d is %x but the log has no event for it", p.Index, p.Digest)}
		}
	}
	return out, nil
}

// Unverified lists the SHA-256 events of the log without replaying it. It
// is for display on the appliance side only.
func Unverified(raw []byte) ([]Event, error) {
	el, err := attest.ParseEventLog(raw)
	if err != nil {
		return nil, fmt.Errorf("parse event log: %w", err)
	}
	var out []Event
	for _, e := range el.Events(attest.HashSHA256) {
		out = append(out, Event{PCR: e.Index, Type: TypeName(e.Type.String()), Digest: hex.EncodeToString(e.Digest), Info: Describe(e.Data)})
	}
	return out, nil
}

// TypeName names the event types of the TCG PC Client Platform Firmware
// Profile that go-attestation prints as numbers (it knows their
// predecessors only). Display only: an event's type is not covered by
// its digest.
func TypeName(t string) string {
	switch t {
	case "EventType(0x8000000a)":
		return "EV_EFI_PLATFORM_FIRMWARE_BLOB2"
	case "EventType(0x8000000b)":
		return "EV_EFI_HANDOFF_TABLES2"
	case "EventType(0x8000000c)":
		return "EV_EFI_VARIABLE_BOOT2"
	}
	return t
}

// MaxDescription bounds Describe's text, so that a hostile event log
// cannot make audit entries and answers that quote it grow.
const MaxDescription = 128

// Describe renders event data for people: ASCII or UTF-16 text (at most
// MaxDescription characters), or its length. Tagged events (the EFI
// stub's) show their description.
func Describe(data []byte) string {
	s := describe(data)
	if r := []rune(s); len(r) > MaxDescription {
		s = string(r[:MaxDescription]) + "…"
	}
	return s
}

func describe(data []byte) string {
	if isPrintable(data) {
		return strings.TrimRight(string(data), "\x00")
	}
	// EFI_TCG2_TAGGED_EVENT / TCG_PCClientTaggedEvent: id(4) size(4) data.
	if len(data) > 8 {
		if s := string(data[8:]); isPrintable([]byte(s)) {
			return strings.TrimRight(s, "\x00")
		}
	}
	if len(data) >= 2 && len(data)%2 == 0 {
		u := make([]uint16, len(data)/2)
		for i := range u {
			u[i] = uint16(data[2*i]) | uint16(data[2*i+1])<<8
		}
		s := strings.TrimRight(string(utf16.Decode(u)), "\x00")
		if s != "" && isPrintable([]byte(s)) {
			return s
		}
	}
	return fmt.Sprintf("%d bytes", len(data))
}

func isPrintable(b []byte) bool {
	t := bytes.TrimRight(b, "\x00")
	if len(t) == 0 {
		return false
	}
	for _, c := range t {
		if c < 0x20 || c > 0x7e {
			return false
		}
	}
	return true
}

// Well-known PCR4 digests besides the kernel: the EV_EFI_ACTION the firmware
// logs before it calls a boot option, and the separator.
var (
	callingBootOption = sha256.Sum256([]byte("Calling EFI Application from Boot Option"))
	returningBootOpt  = sha256.Sum256([]byte("Returning from EFI Application from Boot Option"))
	separator         = sha256.Sum256([]byte{0, 0, 0, 0})
)

// BootCheck is the outcome of comparing replayed events with a manifest.
type BootCheck struct {
	UKIMatch         bool     `json:"uki_match"`
	SecureBootMatch  bool     `json:"secure_boot_match"`
	LoadOptionsMatch bool     `json:"load_options_match"`
	InitrdMatch      bool     `json:"initrd_match"`
	SectionsMatch    bool     `json:"sections_match"`
	Problems         []string `json:"problems,omitempty"`
}

// OK reports whether the boot matched the manifest completely.
func (c *BootCheck) OK() bool {
	return c.UKIMatch && c.SecureBootMatch && c.LoadOptionsMatch && c.InitrdMatch && c.SectionsMatch && len(c.Problems) == 0
}

// ImagePCRs are the PCRs CheckBoot compares with a manifest; PCRs 8, 12
// and 13 must hold no event at all (no boot loader before the UKI, no
// command-line or credential overrides of systemd-stub, no system
// extensions picked up beside the UKI).
var (
	ImagePCRs = []int{4, 7, 9, 11}
	EmptyPCRs = []int{8, 12, 13}
)

// CheckBoot compares the verified events with a manifest:
//   - PCR4 must hold the signed UKI's digest exactly once and otherwise
//     only the firmware's boot-option actions and separator;
//   - PCR7 must hold exactly the manifest's Secure Boot events, in order:
//     Secure Boot on, our PK, KEK, db and dbx, and our db certificate as
//     the authority that verified the UKI;
//   - PCR9 must hold exactly the manifest's load-options and initrd
//     digests, each once, and nothing else;
//   - PCR11's events must extend to the manifest's UKI section value;
//   - PCRs 8, 12 and 13 must hold nothing.
func CheckBoot(events []Event, m manifest.Measurements) *BootCheck {
	c := &BootCheck{}
	allowed4 := map[string]bool{
		hex.EncodeToString(callingBootOption[:]): true,
		hex.EncodeToString(returningBootOpt[:]):  true,
		hex.EncodeToString(separator[:]):         true,
	}
	var ukis, loadOpts, initrds, pcr11Events int
	var pcr7 []Event
	var pcr11 [32]byte
	for _, e := range events {
		switch e.PCR {
		case 4:
			switch {
			case e.Digest == m.UKIAuthenticode:
				ukis++
			case allowed4[e.Digest]:
			default:
				c.problem("PCR4 has an unexpected measurement %s (%s)", e.Digest, e.Info)
			}
		case 7:
			pcr7 = append(pcr7, e)
		case 9:
			switch e.Digest {
			case m.LoadOptions:
				loadOpts++
			case m.Initrd:
				initrds++
			default:
				c.problem("PCR9 has an unexpected measurement %s (%s)", e.Digest, e.Info)
			}
		case 11:
			d, err := hex.DecodeString(e.Digest)
			if err != nil || len(d) != 32 {
				c.problem("PCR11 event digest %q is not SHA-256", e.Digest)
				continue
			}
			pcr11 = sha256.Sum256(append(pcr11[:], d...))
			pcr11Events++
		default:
			if slices.Contains(EmptyPCRs, e.PCR) {
				c.problem("PCR%d must hold nothing but has %s %s (%s)", e.PCR, e.Type, e.Digest, e.Info)
			}
		}
	}
	c.UKIMatch = ukis == 1
	c.LoadOptionsMatch = loadOpts == 1
	c.InitrdMatch = initrds == 1
	c.SecureBootMatch = len(pcr7) == len(m.SecureBoot)
	for i, e := range pcr7 {
		if i >= len(m.SecureBoot) {
			c.problem("PCR7 event %d is unexpected: %s %s (%s)", i, e.Type, e.Digest, e.Info)
			continue
		}
		if e.Digest != m.SecureBoot[i] {
			c.SecureBootMatch = false
			c.problem("PCR7 event %d is %s %s (%s), the manifest has %s", i, e.Type, e.Digest, e.Info, m.SecureBoot[i])
		}
	}
	if len(pcr7) < len(m.SecureBoot) {
		c.problem("PCR7 holds %d events, the manifest's Secure Boot policy %d", len(pcr7), len(m.SecureBoot))
	}
	c.SectionsMatch = pcr11Events > 0 && hex.EncodeToString(pcr11[:]) == m.UKISections
	if !c.SectionsMatch {
		c.problem("PCR11's %d events extend to %x, the manifest's UKI sections to %s", pcr11Events, pcr11, m.UKISections)
	}
	if ukis != 1 {
		c.problem("PCR4 holds the manifest's UKI %d times, want once", ukis)
	}
	if loadOpts != 1 {
		c.problem("PCR9 holds the manifest's command line %d times, want once", loadOpts)
	}
	if initrds != 1 {
		c.problem("PCR9 holds the manifest's initrd %d times, want once", initrds)
	}
	return c
}

// maxProblems bounds what a check reports: a hostile log cannot make the
// audit entry grow without limit.
const maxProblems = 16

func (c *BootCheck) problem(format string, args ...any) {
	switch {
	case len(c.Problems) < maxProblems:
		c.Problems = append(c.Problems, fmt.Sprintf(format, args...))
	case len(c.Problems) == maxProblems:
		c.Problems = append(c.Problems, "more problems not shown")
	}
}

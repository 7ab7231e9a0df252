package uki

import "crypto/sha256"

// Event is one PCR 11 measurement systemd-stub makes.
type Event struct {
	Section string // the section it belongs to
	Data    []byte // the measured bytes: the name with its NUL, or the contents
}

// PCR11Events lists what systemd-stub (systemd 252) extends into PCR 11 for
// these sections, in order: for each section it knows, in its fixed order
// (.linux, .osrel, .cmdline, .initrd, ...) and present with a non-zero size,
// first the section name including the terminating NUL, then the section's
// contents (VirtualSize bytes, which Assemble makes the payload's length).
func PCR11Events(s Sections) []Event {
	present := map[string][]byte{}
	for _, sec := range s.List() {
		present[sec.Name] = sec.Data
	}
	var ev []Event
	for _, name := range measureOrder {
		data, ok := present[name]
		if !ok {
			continue
		}
		ev = append(ev, Event{name, append([]byte(name), 0)}, Event{name, data})
	}
	return ev
}

// PredictPCR11 returns the SHA-256 PCR 11 value right after systemd-stub
// has measured the sections, starting from a reset (all-zero) PCR. It is
// what `systemd-measure calculate --bank=sha256 --phase=` prints; nothing
// else extends PCR 11 in the appliance's boot (our initramfs runs no
// systemd-pcrphase).
func PredictPCR11(s Sections) [32]byte {
	var pcr [32]byte
	for _, e := range PCR11Events(s) {
		pcr = Extend(pcr, sha256.Sum256(e.Data))
	}
	return pcr
}

// Extend returns the SHA-256 PCR value after extending pcr by digest.
func Extend(pcr, digest [32]byte) [32]byte {
	return sha256.Sum256(append(pcr[:], digest[:]...))
}

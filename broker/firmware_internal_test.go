package broker

import (
	"crypto/sha256"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/tpm/eventlog"
	"github.com/dataembassy/embassy/tpm/pcrs"
)

func TestDiffFirmware(t *testing.T) {
	ev := func(pcr int, digest string) eventlog.Event {
		return eventlog.Event{PCR: pcr, Type: "EV_X", Digest: strings.Repeat(digest, 64/len(digest)), Info: "blob " + digest}
	}
	fw := func(events ...eventlog.Event) *firmware {
		f := &firmware{PCRs: map[int][]byte{}, Events: events}
		for _, i := range pcrs.Platform() {
			h := sha256.New() // a value that differs with the PCR's events
			for _, e := range eventsOf(events, i) {
				h.Write([]byte(e.Digest))
			}
			f.PCRs[i] = h.Sum(nil)
		}
		return f
	}
	ref := fw(ev(0, "a"), ev(0, "b"), ev(0, "c"), ev(7, "d"))
	tests := []struct {
		name    string
		ref     *firmware
		got     *firmware
		changed []int
		lines   []string
	}{
		{"same", ref, fw(ev(0, "a"), ev(0, "b"), ev(0, "c"), ev(7, "d")), nil, nil},
		{"changed event", ref, fw(ev(0, "a"), ev(0, "e"), ev(0, "c"), ev(7, "d")), []int{0},
			[]string{`PCR0: event 1 EV_X digest eeeeeeeeeeee… (was bbbbbbbbbbbb…) "blob e"`}},
		{"added event", ref, fw(ev(0, "a"), ev(0, "b"), ev(0, "c"), ev(7, "d"), ev(7, "f")), []int{7},
			[]string{`PCR7: event 1 added: EV_X digest ffffffffffff… "blob f"`}},
		{"missing event", ref, fw(ev(0, "a"), ev(0, "c"), ev(7, "d")), []int{0},
			[]string{`PCR0: event 1 missing: EV_X digest bbbbbbbbbbbb… "blob b"`}},
		{"no reference", nil, ref, pcrs.Platform(), nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			changed, lines := diffFirmware(tc.ref, tc.got)
			if !slices.Equal(changed, tc.changed) {
				t.Fatalf("changed PCRs %v, want %v", changed, tc.changed)
			}
			if tc.ref == nil {
				if len(lines) == 0 || lines[0] != "no firmware reference" {
					t.Fatalf("lines %q", lines)
				}
				return
			}
			if !slices.Equal(lines, tc.lines) {
				t.Fatalf("lines %q, want %q", lines, tc.lines)
			}
		})
	}
	// The refusal's detail is bounded however many events differ.
	var many []string
	for range 1000 {
		many = append(many, strings.Repeat("x", 100))
	}
	if s := bounded(many, maxDetail); len(s) > maxDetail+20 || !strings.HasSuffix(s, "more") {
		t.Fatalf("bounded detail of %d bytes: %.80q…", len(s), s)
	}
}

// TestNoFirmwareReferenceFailsClosed: an appliance activated before brokers
// recorded a firmware reference is refused with the firmware reason, its
// boot is kept as pending, and an operator's approve-firmware lets it
// attest.
func TestNoFirmwareReferenceFailsClosed(t *testing.T) {
	fb := newFuzzBroker(t)
	if err := fb.b.update(fb.id, func(r *record) error { r.Firmware = nil; return nil }); err != nil {
		t.Fatal(err)
	}
	fb.freshNonce()
	_, err := fb.b.Attest(fb.attest)
	var rj *Rejection
	if !errors.As(err, &rj) || rj.Reason != ReasonFirmware || !strings.Contains(rj.Detail, "no firmware reference") {
		t.Fatalf("appliance without a reference: %v", err)
	}
	r, err := fb.b.load(fb.id)
	if err != nil {
		t.Fatal(err)
	}
	if r.Firmware != nil || r.PendingFirmware == nil || len(r.PendingFirmware.PCRs) != len(pcrs.Platform()) {
		t.Fatalf("record after the refusal: reference %v, pending %+v", r.Firmware, r.PendingFirmware)
	}
	// Sealing never falls back to the request's values.
	if _, err := expectedPCRs(r, fb.attest.PCRs); !errors.As(err, &rj) || rj.Reason != ReasonFirmware {
		t.Fatalf("seal without a reference: %v", err)
	}
	op := audit.Actor{Kind: audit.ActorOperator, Subject: "CN=test operator", Fingerprint: strings.Repeat("0", 64)}
	if err := fb.b.ApproveFirmware(op, fb.id, r.PendingFirmware.digest()); err != nil {
		t.Fatal(err)
	}
	fb.freshNonce()
	if _, err := fb.b.Attest(fb.attest); err != nil {
		t.Fatalf("after approve-firmware: %v", err)
	}
	st, err := fb.b.State()
	if err != nil {
		t.Fatal(err)
	}
	if a := st.Appliances[0]; !a.FirmwareReference || a.PendingFirmware != nil {
		t.Fatalf("state %+v", a)
	}
}

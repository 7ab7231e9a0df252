package qemutests

import (
	"testing"
)

func TestBootMeasured(t *testing.T) {
	requireE2E(t)
	dir := imageDir()
	m := loadImage(t, dir)
	ev, verdict := bootAndVerify(t, dir, bootConfig(t, "measured", dir, m), m)
	if !verdict.Check.OK() {
		t.Fatalf("measured boot does not match the manifest: %+v", verdict.Check)
	}
	// The guest's own report of the PCR4/PCR9 events must agree with what the
	// host verified by replay.
	reported := map[string]bool{}
	for _, e := range ev.ReportedEvents {
		reported[e.Digest] = true
	}
	for _, want := range []string{m.Measurements.KernelQEMUDirect, m.Measurements.LoadOptions, m.Measurements.Initrd} {
		if !reported[want] {
			t.Errorf("guest did not report the event %s", want)
		}
	}
}

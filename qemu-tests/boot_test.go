package qemutests

import (
	"testing"

	"github.com/dataembassy/embassy/qemu-tests/bootreport"
)

// TestBootMeasured: the measured-boot evidence of the provisioned
// embassy's first boot (a boot other scenarios need anyway) replays to its
// PCRs and matches the signed manifest, and the guest's own report of the
// boot events agrees with the replay.
func TestBootMeasured(t *testing.T) {
	requireE2E(t)
	m := loadImage(t, imageDir())
	ev := provisionedEmbassy(t).evidence
	verdict, err := bootreport.Verify(ev, m.Measurements)
	if err != nil {
		t.Fatalf("replay the guest's event log against its PCRs: %v", err)
	}
	for _, e := range verdict.Events {
		t.Logf("PCR%d %s %s %q", e.PCR, e.Type, e.Digest, e.Info)
	}
	if !verdict.Check.OK() {
		t.Fatalf("measured boot does not match the manifest: %+v", verdict.Check)
	}
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

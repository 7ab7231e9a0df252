package qemutests

import (
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/dataembassy/embassy/images/manifest"
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
	saveEvidence(t, ev, m)
	if !verdict.Check.OK() {
		t.Fatalf("measured boot does not match the manifest: %+v", verdict.Check)
	}
	reported := map[string]bool{}
	for _, e := range ev.ReportedEvents {
		reported[e.Digest] = true
	}
	for _, want := range []string{m.Measurements.UKIAuthenticode, m.Measurements.LoadOptions, m.Measurements.Initrd} {
		if !reported[want] {
			t.Errorf("guest did not report the event %s", want)
		}
	}
}

// saveEvidence writes the boot's event log, PCR values and the manifest's
// measurements to the test's log folder, in the form of
// tpm/eventlog/testdata (which is refreshed from there when the boot
// changes).
func saveEvidence(t *testing.T, ev *bootreport.Evidence, m *manifest.Manifest) {
	t.Helper()
	dir := testLogDir(t)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	pcrs := map[string]string{}
	for i, v := range ev.PCRs {
		pcrs[strconv.Itoa(i)] = hex.EncodeToString(v)
	}
	pb, _ := json.MarshalIndent(map[string]any{"pcrs": pcrs}, "", " ")
	mb, _ := json.MarshalIndent(m.Measurements, "", " ")
	for name, b := range map[string][]byte{"eventlog": ev.EventLog, "pcrs.json": pb, "measurements.json": mb} {
		if err := os.WriteFile(filepath.Join(dir, "ovmf-secboot-uki."+name), b, 0o644); err != nil {
			t.Error(err)
		}
	}
}

package eventlog

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"strconv"
	"testing"

	"github.com/dataembassy/embassy/images/manifest"
)

// The testdata holds a real event log and the PCR values read from the TPM
// on the same boot: our image's disk under OVMF's Secure Boot build +
// swtpm, captured by the serial console report of embassy-init
// (TestBootMeasured), and the measurements of that image's manifest.
func loadReal(t testing.TB) ([]byte, map[int][]byte) {
	t.Helper()
	raw, err := os.ReadFile("testdata/ovmf-secboot-uki.eventlog")
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("testdata/ovmf-secboot-uki.pcrs.json")
	if err != nil {
		t.Fatal(err)
	}
	var f struct{ PCRs map[string]string }
	if err := json.Unmarshal(b, &f); err != nil {
		t.Fatal(err)
	}
	pcrs := map[int][]byte{}
	for k, v := range f.PCRs {
		i, _ := strconv.Atoi(k)
		pcrs[i], _ = hex.DecodeString(v)
	}
	return raw, pcrs
}

// realMeasurements are the manifest measurements of the image of that boot.
func realMeasurements(t testing.TB) manifest.Measurements {
	t.Helper()
	b, err := os.ReadFile("testdata/ovmf-secboot-uki.measurements.json")
	if err != nil {
		t.Fatal(err)
	}
	var m manifest.Measurements
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestReplayRealLog(t *testing.T) {
	raw, pcrs := loadReal(t)
	events, err := Replay(raw, pcrs)
	if err != nil {
		t.Fatal(err)
	}
	c := CheckBoot(events, realMeasurements(t))
	if !c.OK() {
		t.Fatalf("real boot does not check: %+v", c)
	}
}

func TestReplayRejects(t *testing.T) {
	raw, pcrs := loadReal(t)
	copyPCRs := func() map[int][]byte {
		m := map[int][]byte{}
		for k, v := range pcrs {
			m[k] = append([]byte(nil), v...)
		}
		return m
	}
	var re *ReplayError

	// PCR9 extended after the log was taken.
	p := copyPCRs()
	h := sha256.Sum256(append(p[9], make([]byte, 32)...))
	p[9] = h[:]
	if _, err := Replay(raw, p); !errors.As(err, &re) {
		t.Errorf("extended PCR9: got %v, want ReplayError", err)
	}
	// A PCR with no events must be zero.
	p = copyPCRs()
	p[8] = h[:]
	if _, err := Replay(raw, p); !errors.As(err, &re) {
		t.Errorf("non-zero PCR8 without events: got %v, want ReplayError", err)
	}
	// An event digest changed in the log.
	evs, _ := Replay(raw, pcrs)
	var initrd []byte
	for _, e := range evs {
		if e.Digest == realMeasurements(t).Initrd {
			initrd, _ = hex.DecodeString(e.Digest)
		}
	}
	tampered := append([]byte(nil), raw...)
	at := indexOf(tampered, initrd)
	if at < 0 {
		t.Fatal("initrd digest not found in the raw log")
	}
	tampered[at] ^= 1
	if _, err := Replay(tampered, pcrs); !errors.As(err, &re) {
		t.Errorf("changed event digest: got %v, want ReplayError", err)
	}
	// Malformed input.
	for name, in := range map[string][]byte{"empty": nil, "garbage": []byte("not an event log"), "truncated": raw[:len(raw)/2]} {
		if _, err := Replay(in, pcrs); err == nil {
			t.Errorf("%s log accepted", name)
		}
	}
	if _, err := Replay(raw, map[int][]byte{4: {1, 2}}); err == nil {
		t.Error("short PCR value accepted")
	}
}

func indexOf(b, sub []byte) int {
	for i := 0; i+len(sub) <= len(b); i++ {
		if string(b[i:i+len(sub)]) == string(sub) {
			return i
		}
	}
	return -1
}

func TestCheckBoot(t *testing.T) {
	raw, pcrs := loadReal(t)
	events, err := Replay(raw, pcrs)
	if err != nil {
		t.Fatal(err)
	}
	realBoot := realMeasurements(t)
	other := "00" + realBoot.Initrd[2:]
	tests := []struct {
		name   string
		mutate func(m *manifest.Measurements)
		check  func(c *BootCheck) bool
	}{
		{"other initrd", func(m *manifest.Measurements) { m.Initrd = other }, func(c *BootCheck) bool { return !c.InitrdMatch && c.UKIMatch }},
		{"other cmdline", func(m *manifest.Measurements) { m.LoadOptions = other }, func(c *BootCheck) bool { return !c.LoadOptionsMatch && c.InitrdMatch }},
		{"other UKI", func(m *manifest.Measurements) { m.UKIAuthenticode = other }, func(c *BootCheck) bool { return !c.UKIMatch && c.SecureBootMatch }},
		{"other UKI sections", func(m *manifest.Measurements) { m.UKISections = other }, func(c *BootCheck) bool { return !c.SectionsMatch && c.UKIMatch }},
		{"other db authority", func(m *manifest.Measurements) {
			m.SecureBoot = append([]string(nil), m.SecureBoot...)
			m.SecureBoot[len(m.SecureBoot)-1] = other
		}, func(c *BootCheck) bool { return !c.SecureBootMatch && c.UKIMatch }},
		{"policy without the authority", func(m *manifest.Measurements) { m.SecureBoot = m.SecureBoot[:len(m.SecureBoot)-1] },
			func(c *BootCheck) bool { return !c.SecureBootMatch }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := realBoot
			tc.mutate(&m)
			c := CheckBoot(events, m)
			if c.OK() || !tc.check(c) || len(c.Problems) == 0 {
				t.Fatalf("unexpected check: %+v", c)
			}
		})
	}
	// Event types and descriptions are not trusted: an extra PCR9 event is
	// refused whatever it claims to be.
	extra := append(append([]Event(nil), events...), Event{PCR: 9, Type: "EV_EVENT_TAG", Digest: other, Info: "Linux initrd"})
	if c := CheckBoot(extra, realBoot); c.OK() {
		t.Fatal("an extra PCR9 event passed")
	}
	// The UKI measured twice is refused, and so is anything in PCR12.
	var uki Event
	for _, e := range events {
		if e.Digest == realBoot.UKIAuthenticode {
			uki = e
		}
	}
	if c := CheckBoot(append(append([]Event(nil), events...), uki), realBoot); c.OK() {
		t.Fatal("a UKI measured twice passed")
	}
	if c := CheckBoot(append(append([]Event(nil), events...), Event{PCR: 12, Type: "EV_IPL", Digest: other}), realBoot); c.OK() {
		t.Fatal("a PCR12 command-line override passed")
	}
}

func FuzzReplay(f *testing.F) {
	raw, pcrs := loadReal(f)
	realBoot := realMeasurements(f)
	f.Add(raw)
	f.Add(raw[:100])
	f.Fuzz(func(t *testing.T, b []byte) {
		events, err := Replay(b, pcrs)
		if err != nil {
			return
		}
		CheckBoot(events, realBoot)
	})
}

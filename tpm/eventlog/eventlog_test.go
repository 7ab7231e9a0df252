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
// on the same boot: our image under OVMF + swtpm, captured by the serial
// console report of embassy-init (TestBootMeasured).
func loadReal(t testing.TB) ([]byte, map[int][]byte) {
	t.Helper()
	raw, err := os.ReadFile("testdata/ovmf-q35-swtpm.eventlog")
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("testdata/ovmf-q35-swtpm.pcrs.json")
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

// Expected digests of that boot.
var realBoot = manifest.Measurements{
	KernelAuthenticode: "6b1bf35c3bee9918250f593a6fff889c75c1e239cd2fe9e5bb0cd3de9dcb8e51",
	KernelQEMUDirect:   "f8007c34e24b30340060b4a6e2912084fab66bd426849c123204361a75761b65",
	QEMUMemoryMiB:      1024,
	LoadOptions:        "2e929f9b7a5ef97fe923969f2821643f54a6230e36e5e9730c9617ebd1d7b251",
	Initrd:             "f7021a84c6032d760538559cba73d885a8a9526b3c43653113a88de09abbca54",
}

func TestReplayRealLog(t *testing.T) {
	raw, pcrs := loadReal(t)
	events, err := Replay(raw, pcrs)
	if err != nil {
		t.Fatal(err)
	}
	c := CheckBoot(events, realBoot)
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
		if e.Digest == realBoot.Initrd {
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
	other := "00" + realBoot.Initrd[2:]
	tests := []struct {
		name   string
		mutate func(m *manifest.Measurements)
		check  func(c *BootCheck) bool
	}{
		{"other initrd", func(m *manifest.Measurements) { m.Initrd = other }, func(c *BootCheck) bool { return !c.InitrdMatch && c.KernelMatch }},
		{"other cmdline", func(m *manifest.Measurements) { m.LoadOptions = other }, func(c *BootCheck) bool { return !c.LoadOptionsMatch && c.InitrdMatch }},
		{"other kernel", func(m *manifest.Measurements) { m.KernelQEMUDirect = other }, func(c *BootCheck) bool { return !c.KernelMatch }},
		{"hardware-only manifest", func(m *manifest.Measurements) { m.KernelQEMUDirect, m.QEMUMemoryMiB = "", 0 }, func(c *BootCheck) bool { return !c.KernelMatch }},
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
	// The kernel measured twice is refused.
	var kernel Event
	for _, e := range events {
		if e.Digest == realBoot.KernelQEMUDirect {
			kernel = e
		}
	}
	if c := CheckBoot(append(append([]Event(nil), events...), kernel), realBoot); c.OK() {
		t.Fatal("a kernel measured twice passed")
	}
}

func FuzzReplay(f *testing.F) {
	raw, pcrs := loadReal(f)
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

package upgrade_test

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dataembassy/embassy/appliance/upgrade"
	"github.com/dataembassy/embassy/images/authenticode/petest"
	"github.com/dataembassy/embassy/images/diskimage"
	"github.com/dataembassy/embassy/images/manifest"
	"github.com/dataembassy/embassy/images/measure"
)

// signed returns a manifest of version v predicting uki, and its signature.
func signed(t *testing.T, key ed25519.PrivateKey, v uint64, uki []byte) ([]byte, []byte) {
	t.Helper()
	d, err := measure.Authenticode(uki)
	if err != nil {
		t.Fatal(err)
	}
	hexd := func(b byte) string { return strings.Repeat(hex.EncodeToString([]byte{b}), 32) }
	m := &manifest.Manifest{Schema: manifest.Schema, Version: v,
		Kernel: manifest.KernelInfo{Package: "linux-image-amd64", Version: "6.1", Release: "6.1.0-56-amd64", DebSHA256: hexd(1)},
		Stub:   manifest.PackageInfo{Package: "systemd-boot-efi", Version: "252", DebSHA256: hexd(2)},
		Measurements: manifest.Measurements{UKIAuthenticode: hex.EncodeToString(d[:]), SecureBoot: []string{hexd(3)},
			LoadOptions: hexd(4), Initrd: hexd(5), UKISections: hexd(6)}}
	for _, c := range []string{manifest.ComponentCmdline, manifest.ComponentInitramfs, manifest.ComponentKernel} {
		m.SetComponent(c, make([]byte, 32))
	}
	b, err := m.Marshal()
	if err != nil {
		t.Fatalf("manifest: %v", err)
	}
	return b, manifest.Sign(b, key)
}

func TestCheck(t *testing.T) {
	pub, key, _ := ed25519.GenerateKey(rand.Reader)
	_, otherKey, _ := ed25519.GenerateKey(rand.Reader)
	uki := petest.MinimalPE(16, 1, nil)
	m2, s2 := signed(t, key, 2, uki)
	_, sOther := signed(t, otherKey, 2, uki)
	m1, s1 := signed(t, key, 1, uki)
	tests := []struct {
		name          string
		m, sig, image []byte
		running       uint64
		err           error
	}{
		{"newer, signed, matching", m2, s2, uki, 1, nil},
		{"signed by another key", m2, sOther, uki, 1, manifest.ErrBadSignature},
		{"same version", m1, s1, uki, 1, upgrade.ErrNotNewer},
		{"older version", m1, s1, uki, 2, upgrade.ErrNotNewer},
		{"another UKI", m2, s2, petest.MinimalPE(16, 2, nil), 1, upgrade.ErrUKIMismatch},
		{"no UKI", m2, s2, nil, 1, diskimage.ErrEmpty},
		{"not a PE", m2, s2, []byte("MZ but nothing else"), 1, upgrade.ErrUKIMismatch},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			img, err := upgrade.Check(tc.m, tc.sig, tc.image, pub, tc.running)
			if tc.err == nil {
				if err != nil || img.Manifest.Version != 2 || !bytes.Equal(img.UKI, uki) {
					t.Fatalf("Check: %v", err)
				}
				return
			}
			if !errors.Is(err, tc.err) || img != nil {
				t.Fatalf("Check: %v, want %v", err, tc.err)
			}
		})
	}
}

// TestSlots: the trial slot is written and read back; Commit copies it
// into slot A only when it holds the running image.
func TestSlots(t *testing.T) {
	v1, v2 := petest.MinimalPE(16, 1, nil), petest.MinimalPE(16, 2, nil)
	path := filepath.Join(t.TempDir(), "embassy.img")
	if err := diskimage.Write(path, v1); err != nil {
		t.Fatal(err)
	}
	d := upgrade.Disk{Path: path}
	if got, err := d.ReadSlot(upgrade.SlotA); err != nil || !bytes.Equal(got, v1) {
		t.Fatalf("slot A: %v", err)
	}
	if _, err := d.ReadSlot(upgrade.SlotB); !errors.Is(err, upgrade.ErrSlot) {
		t.Fatalf("empty slot B: %v", err)
	}
	if err := d.WriteSlot(upgrade.SlotB, v2); err != nil {
		t.Fatal(err)
	}
	digest := func(b []byte) [32]byte {
		d, err := measure.Authenticode(b)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	// Booted from slot A (v1): nothing to commit.
	if changed, err := d.Commit(digest(v1)); !errors.Is(err, upgrade.ErrNotRunning) || changed {
		t.Fatalf("commit while running slot A's image: %v %v", changed, err)
	}
	if got, _ := d.ReadSlot(upgrade.SlotA); !bytes.Equal(got, v1) {
		t.Fatal("slot A changed")
	}
	// Booted from slot B (v2): committed, once.
	if changed, err := d.Commit(digest(v2)); err != nil || !changed {
		t.Fatalf("commit of the running trial: %v %v", changed, err)
	}
	if got, _ := d.ReadSlot(upgrade.SlotA); !bytes.Equal(got, v2) {
		t.Fatal("slot A does not hold the committed image")
	}
	if changed, err := d.Commit(digest(v2)); err != nil || changed {
		t.Fatalf("second commit: %v %v", changed, err)
	}
	// A trial slot that cannot be read is an error, never "nothing to do".
	empty := filepath.Join(t.TempDir(), "fresh.img")
	if err := diskimage.Write(empty, v1); err != nil {
		t.Fatal(err)
	}
	if changed, err := (upgrade.Disk{Path: empty}).Commit(digest(v2)); !errors.Is(err, upgrade.ErrSlot) || changed {
		t.Fatalf("commit with an empty trial slot: %v %v", changed, err)
	}
	// The GPT is as built: the layout check still passes, and the image
	// matches what diskimage.Write makes for v2 but for slot B's content.
	if err := d.WriteSlot(upgrade.SlotB, make([]byte, diskimage.MaxUKISize+1)); !errors.Is(err, diskimage.ErrTooLarge) {
		t.Fatalf("oversized UKI: %v", err)
	}
	// Not a boot disk: refused before anything is written.
	other := filepath.Join(t.TempDir(), "data.img")
	os.WriteFile(other, make([]byte, 4<<20), 0o600)
	if err := (upgrade.Disk{Path: other}).WriteSlot(upgrade.SlotB, v2); err == nil {
		t.Fatal("wrote a slot onto a disk that is not laid out as embassy.img")
	}
	if b, _ := os.ReadFile(other); !bytes.Equal(b, make([]byte, 4<<20)) {
		t.Fatal("the refused disk changed")
	}
}

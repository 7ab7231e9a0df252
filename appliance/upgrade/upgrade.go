// Package upgrade is the appliance's side of an image upgrade. It checks a
// pushed image (a manifest signed with the image-signing key, a version
// above the running one, a UKI whose Authenticode digest is the manifest's
// PCR4 prediction) and writes it to the boot disk's trial slot (B). Slot A
// holds the committed image, the one the firmware boots by default; the
// trial slot is booted once through UEFI BootNext, and once the new image
// runs and has attested, Commit copies it into slot A. An image that
// never comes up is never committed: the next boot is slot A's, the old
// image.
//
// Neither slot write touches what the platform measures: the GPT stays as
// it is (PCR5), and only the slot file systems change.
package upgrade

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/dataembassy/embassy/images/diskimage"
	"github.com/dataembassy/embassy/images/manifest"
	"github.com/dataembassy/embassy/images/measure"
)

// Errors callers branch on.
var (
	// ErrNotNewer: the pushed image's version is not above the running one.
	ErrNotNewer = errors.New("image is not newer than the running one")
	// ErrUKIMismatch: the UKI is not the one the signed manifest predicts.
	ErrUKIMismatch = errors.New("UKI does not match the signed manifest")
	// ErrSlot: a slot's content is not what was written, or not there.
	ErrSlot = errors.New("boot slot unusable")
	// ErrNotRunning: the trial slot does not hold the running image, so
	// there is nothing to commit.
	ErrNotRunning = errors.New("the trial slot does not hold the running image")
)

// Image is a pushed image that passed Check.
type Image struct {
	Manifest *manifest.Manifest
	UKI      []byte
}

// Check verifies a pushed image against the image-signing public key and
// the running image's version. Nothing of an image that fails is kept.
func Check(manifestBytes, signature, uki []byte, pub ed25519.PublicKey, running uint64) (*Image, error) {
	m, err := manifest.Verify(manifestBytes, signature, pub)
	if err != nil {
		return nil, fmt.Errorf("pushed image: %w", err)
	}
	if m.Version <= running {
		return nil, fmt.Errorf("%w: version %d, running %d", ErrNotNewer, m.Version, running)
	}
	if err := diskimage.CheckUKI(uki); err != nil {
		return nil, fmt.Errorf("pushed image: %w", err)
	}
	d, err := measure.Authenticode(uki)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUKIMismatch, err)
	}
	if got := hex.EncodeToString(d[:]); got != m.Measurements.UKIAuthenticode {
		return nil, fmt.Errorf("%w: Authenticode %s, manifest predicts %s", ErrUKIMismatch, got, m.Measurements.UKIAuthenticode)
	}
	return &Image{Manifest: m, UKI: uki}, nil
}

// Slot is one of the boot disk's two slots.
type Slot int

const (
	SlotA Slot = iota // committed: the firmware's default boot
	SlotB             // trial: booted once through BootNext
)

func (s Slot) String() string {
	if s == SlotA {
		return "A"
	}
	return "B"
}

// geometry returns the slot's byte offset on the disk and its label.
func (s Slot) geometry() (offset int64, label string, err error) {
	switch s {
	case SlotA:
		return diskimage.SlotAFirstLBA * diskimage.SectorSize, diskimage.LabelA, nil
	case SlotB:
		return diskimage.SlotBFirstLBA * diskimage.SectorSize, diskimage.LabelB, nil
	}
	return 0, "", fmt.Errorf("%w: no slot %d", ErrSlot, int(s))
}

// Disk is the appliance's boot disk (a block device, or an image file in
// tests), laid out as embassy.img.
type Disk struct {
	Path string
}

// open opens the disk and checks that it is laid out as embassy.img.
func (d Disk) open(flag int) (*os.File, error) {
	f, err := os.OpenFile(d.Path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("boot disk: %w", err)
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("boot disk size: %w", err)
	}
	layout, err := diskimage.Inspect(f, size)
	if err == nil {
		err = diskimage.CheckLayout(layout)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("boot disk %s: %w", d.Path, err)
	}
	return f, nil
}

// WriteSlot writes uki into slot as that slot's whole file system, flushes
// it to the disk and reads it back: an error means the slot must not be
// booted.
func (d Disk) WriteSlot(slot Slot, uki []byte) error {
	off, label, err := slot.geometry()
	if err != nil {
		return err
	}
	img, err := diskimage.SlotImage(label, uki)
	if err != nil {
		return err
	}
	f, err := d.open(os.O_RDWR)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.WriteAt(img, off); err != nil {
		return fmt.Errorf("write slot %s: %w", slot, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("flush slot %s: %w", slot, err)
	}
	back := make([]byte, len(img))
	if _, err := f.ReadAt(back, off); err != nil {
		return fmt.Errorf("read back slot %s: %w", slot, err)
	}
	if sha256.Sum256(back) != sha256.Sum256(img) {
		return fmt.Errorf("%w: slot %s reads back otherwise than written", ErrSlot, slot)
	}
	return nil
}

// ReadSlot returns the UKI in slot (at diskimage.BootPath).
func (d Disk) ReadSlot(slot Slot) ([]byte, error) {
	off, _, err := slot.geometry()
	if err != nil {
		return nil, err
	}
	f, err := d.open(os.O_RDONLY)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	uki, err := diskimage.ReadFile(io.NewSectionReader(f, off, diskimage.SlotSize), diskimage.BootPath)
	if err != nil {
		return nil, fmt.Errorf("%w: slot %s: %w", ErrSlot, slot, err)
	}
	return uki, nil
}

// Commit copies the UKI of the trial slot into slot A, the firmware's
// default; call it once the running image attested. booted is the
// Authenticode digest the firmware measured into PCR4 for this boot: the
// trial slot is committed only if it holds exactly the running image. It
// is ErrNotRunning if slot B holds another image (this boot came from
// slot A, or slot B changed since), and an error wrapping ErrSlot if slot
// B cannot be read. It reports whether slot A changed.
func (d Disk) Commit(booted [32]byte) (bool, error) {
	uki, err := d.ReadSlot(SlotB)
	if err != nil {
		return false, err
	}
	got, err := measure.Authenticode(uki)
	if err != nil {
		return false, fmt.Errorf("%w: slot B: %w", ErrSlot, err)
	}
	if got != booted {
		return false, ErrNotRunning
	}
	if cur, err := d.ReadSlot(SlotA); err == nil && bytes.Equal(cur, uki) {
		return false, nil
	}
	if err := d.WriteSlot(SlotA, uki); err != nil {
		return false, err
	}
	return true, nil
}

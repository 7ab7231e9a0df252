// Package diskimage writes embassy.img, the GPT disk image a server boots
// from: a signed Unified Kernel Image on an EFI System Partition, found by
// the firmware at the removable-media default path, with a second, empty
// slot for upgrades. Two builds of the same UKI are byte-identical.
//
// Layout (fixed; 512-byte sectors, LBA = sector number):
//
//	LBA 0              protective MBR (one 0xEE partition from LBA 1)
//	LBA 1              primary GPT header
//	LBA 2-33           primary partition entries: 128 of 128 bytes
//	LBA 34-2047        unused (zero), for the 1 MiB alignment
//	LBA 2048-133119    partition 1 "embassy-a", EFI System Partition, 64 MiB:
//	                   FAT32 "EMBASSY-A" holding /EFI/BOOT/BOOTX64.EFI
//	LBA 133120-264191  partition 2 "embassy-b", EFI System Partition, 64 MiB:
//	                   FAT32 "EMBASSY-B", empty
//	LBA 264192-266206  unused (zero)
//	LBA 266207-266238  backup partition entries
//	LBA 266239         backup GPT header
//
// The image is 130 MiB. The disk GUID and both partitions' unique GUIDs are
// constants, so the GPT is the same for every build. The firmware measures
// the GPT into PCR 5; an upgrade therefore never edits it but writes a
// whole new file system into the other slot (SlotImage), which is the same
// size in every image.
//
// The FAT32 file systems are this package's own (FAT32), so that every
// byte follows from the inputs: in a slot, 32 reserved sectors (boot
// sector and FSInfo, their copies at 6 and 7), two FATs of 1009 sectors,
// 129022 clusters of 512 bytes from sector 2050, the root directory at
// cluster 2 and the rest allocated contiguously in name order; a volume ID
// derived from the label, timestamps fixed at 2000-01-01 00:00, upper-case
// 8.3 names and no long names. Inspect and ReadFile read an image back,
// checking every field they rely on.
package diskimage

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/dataembassy/embassy/images/ovmfvars"
)

// GUID is an EFI GUID in its on-disk (mixed-endian) byte order.
type GUID = ovmfvars.GUID

// Layout of embassy.img.
const (
	SectorSize = 512      // bytes per sector (LBA)
	EntryCount = 128      // GPT partition entries
	EntrySize  = 128      // bytes per GPT partition entry
	Alignment  = 1 << 20  // partitions start on 1 MiB boundaries
	SlotSize   = 64 << 20 // bytes in each slot partition
	MaxUKISize = 24 << 20 // the largest UKI Write and SlotImage accept

	// ImageSize is the whole image: the primary GPT and alignment, the two
	// slots, and the last MiB for the backup GPT.
	ImageSize    = Alignment + 2*SlotSize + Alignment
	ImageSectors = ImageSize / SectorSize

	SlotAFirstLBA = Alignment / SectorSize
	SlotALastLBA  = SlotAFirstLBA + SlotSize/SectorSize - 1
	SlotBFirstLBA = SlotALastLBA + 1
	SlotBLastLBA  = SlotBFirstLBA + SlotSize/SectorSize - 1

	NameA  = "embassy-a" // GPT partition names
	NameB  = "embassy-b"
	LabelA = "EMBASSY-A" // FAT volume labels
	LabelB = "EMBASSY-B"

	// BootPath is where UEFI firmware looks for a boot loader on removable
	// media (and on any disk without a boot entry) on x86-64.
	BootPath = "/EFI/BOOT/BOOTX64.EFI"
)

// Fixed GUIDs of the image.
var (
	// ESPType is the partition type GUID of an EFI System Partition.
	ESPType = ovmfvars.MustGUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")

	DiskGUID  = ovmfvars.MustGUID("01ee7b67-2907-41d6-ad2c-76a92924b20b")
	SlotAGUID = ovmfvars.MustGUID("d5f61289-48d5-4f45-ba95-1a12ce60dd08")
	SlotBGUID = ovmfvars.MustGUID("50f2b60b-2d57-4dce-b536-2ddce0761b07")
)

var (
	// ErrEmpty is returned for an empty UKI.
	ErrEmpty = errors.New("UKI is empty")
	// ErrTooLarge is returned for a UKI larger than MaxUKISize.
	ErrTooLarge = errors.New("UKI too large")
	// ErrLayout is returned by CheckLayout for a disk laid out otherwise.
	ErrLayout = errors.New("disk is not laid out as embassy.img")
)

// Layout returns the disk Inspect finds in an image this package wrote.
func Layout() *Disk {
	return &Disk{
		GUID:           DiskGUID,
		Sectors:        ImageSectors,
		FirstUsableLBA: 2 + entrySectors,
		LastUsableLBA:  ImageSectors - 2 - entrySectors,
		Partitions: []Partition{
			{Number: 1, Type: ESPType, GUID: SlotAGUID, Name: NameA, FirstLBA: SlotAFirstLBA, LastLBA: SlotALastLBA},
			{Number: 2, Type: ESPType, GUID: SlotBGUID, Name: NameB, FirstLBA: SlotBFirstLBA, LastLBA: SlotBLastLBA},
		},
	}
}

// CheckLayout returns an error wrapping ErrLayout unless d is the layout of
// embassy.img (Layout), so that a slot can be rewritten in place.
func CheckLayout(d *Disk) error {
	want := Layout()
	if d.GUID != want.GUID || d.Sectors != want.Sectors || d.FirstUsableLBA != want.FirstUsableLBA || d.LastUsableLBA != want.LastUsableLBA {
		return fmt.Errorf("%w: disk GUID %s, %d sectors, usable LBA %d-%d; want %s, %d, %d-%d", ErrLayout,
			d.GUID, d.Sectors, d.FirstUsableLBA, d.LastUsableLBA, want.GUID, want.Sectors, want.FirstUsableLBA, want.LastUsableLBA)
	}
	if len(d.Partitions) != len(want.Partitions) {
		return fmt.Errorf("%w: %d partitions, want %d", ErrLayout, len(d.Partitions), len(want.Partitions))
	}
	for i, p := range d.Partitions {
		if p != want.Partitions[i] {
			return fmt.Errorf("%w: partition %+v, want %+v", ErrLayout, p, want.Partitions[i])
		}
	}
	return nil
}

// CheckUKI refuses a UKI that is empty or larger than MaxUKISize.
func CheckUKI(uki []byte) error {
	if len(uki) == 0 {
		return ErrEmpty
	}
	if len(uki) > MaxUKISize {
		return fmt.Errorf("%w: %d bytes, at most %d", ErrTooLarge, len(uki), MaxUKISize)
	}
	return nil
}

// SlotImage returns a whole slot's file system (SlotSize bytes) holding uki
// at BootPath, under the volume label given (LabelA or LabelB): what an
// upgrade writes over the other slot's partition.
func SlotImage(label string, uki []byte) ([]byte, error) {
	if err := CheckUKI(uki); err != nil {
		return nil, err
	}
	return FAT32(SlotSize, label, []File{{Path: BootPath, Data: uki}})
}

// Build writes the disk image to w (ImageSize bytes): the protective MBR,
// both GPTs, slot A with the files given and slot B empty. It writes the
// MBR, the GPTs and each file system's metadata, directories and files in
// full, but not the gaps between them or the free clusters, so w must read
// as zero where nothing is written: a new file truncated to ImageSize (as
// Write makes), or zeroed memory. Nothing is written unless the files fit.
func Build(w io.WriterAt, files []File) error {
	a, err := planFAT32(SlotSize, LabelA, files)
	if err != nil {
		return fmt.Errorf("diskimage: slot A: %w", err)
	}
	b, err := planFAT32(SlotSize, LabelB, nil)
	if err != nil {
		return fmt.Errorf("diskimage: slot B: %w", err)
	}
	l := Layout()
	if err := writeGPT(w, l); err != nil {
		return fmt.Errorf("diskimage: %w", err)
	}
	if err := a.write(io.NewOffsetWriter(w, SlotAFirstLBA*SectorSize)); err != nil {
		return fmt.Errorf("diskimage: slot A: %w", err)
	}
	if err := b.write(io.NewOffsetWriter(w, SlotBFirstLBA*SectorSize)); err != nil {
		return fmt.Errorf("diskimage: slot B: %w", err)
	}
	return nil
}

// Write writes embassy.img to path with uki at BootPath in slot A. The file
// is written beside path and renamed over it when complete; the areas
// nothing is written to are left as holes of the new file, so it is sparse
// where the file system allows.
func Write(path string, uki []byte) (err error) {
	if err := CheckUKI(uki); err != nil {
		return fmt.Errorf("diskimage: %w", err)
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("diskimage: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err := f.Truncate(ImageSize); err != nil {
		return fmt.Errorf("diskimage: %w", err)
	}
	if err := Build(f, []File{{Path: BootPath, Data: uki}}); err != nil {
		return err
	}
	if err := f.Chmod(0o644); err != nil {
		return fmt.Errorf("diskimage: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("diskimage: %w", err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("diskimage: %w", err)
	}
	return nil
}

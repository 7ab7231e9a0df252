// Package discover finds the appliance's data disks and classifies each as
// blank, one of ours, foreign or the boot medium. Only blank disks may be
// provisioned and only ours may be unlocked; a foreign disk is never
// touched.
package discover

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/siderolabs/go-blockdevice/v2/blkid"
	"github.com/siderolabs/go-blockdevice/v2/block"

	"github.com/dataembassy/embassy/disks/luks2"
	"github.com/dataembassy/embassy/disks/provision"
)

// Kind is what a disk holds.
type Kind string

// Disk kinds.
const (
	Blank   Kind = "blank"   // no signature and zeroed at both ends: may be provisioned
	Ours    Kind = "ours"    // GPT + embassy partition + our LUKS2 volume
	Foreign Kind = "foreign" // anything else: never touched
	Boot    Kind = "boot"    // carries an EFI system partition: the boot medium
)

// espType is the GPT type GUID of an EFI system partition.
const espType = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"

// zeroProbe is how much of each end of a disk must be zero for it to count
// as blank.
const zeroProbe = 1 << 20

// Disk is a classified disk.
type Disk struct {
	Path       string `json:"path"`
	Name       string `json:"name"`
	Size       uint64 `json:"size"`
	Model      string `json:"model,omitempty"`
	Serial     string `json:"serial,omitempty"`
	WWID       string `json:"wwid,omitempty"`
	Rotational bool   `json:"rotational"`
	Kind       Kind   `json:"kind"`
	// Detail says why a disk is foreign, or names our volume.
	Detail string `json:"detail,omitempty"`
	// For our disks: where the partition lies and the LUKS UUID.
	PartitionOffset uint64 `json:"partition_offset,omitempty"`
	PartitionIndex  uint   `json:"partition_index,omitempty"`
	LUKSUUID        string `json:"luks_uuid,omitempty"`
}

// skipped are kernel block devices that are never data disks.
var skippedPrefixes = []string{"loop", "ram", "zram", "dm-", "sr", "md", "nbd", "fd"}

// List classifies every whole disk the kernel knows (from sysBlock,
// normally /sys/block), with device nodes under devDir (normally /dev).
func List(sysBlock, devDir string) ([]Disk, error) {
	ents, err := os.ReadDir(sysBlock)
	if err != nil {
		return nil, fmt.Errorf("list block devices: %w", err)
	}
	var out []Disk
	for _, e := range ents {
		name := e.Name()
		skip := false
		for _, p := range skippedPrefixes {
			if strings.HasPrefix(name, p) {
				skip = true
			}
		}
		if skip {
			continue
		}
		d, err := Classify(filepath.Join(devDir, name))
		if err != nil {
			d = &Disk{Path: filepath.Join(devDir, name), Name: name, Kind: Foreign, Detail: "unreadable: " + err.Error()}
		}
		if bd, err := block.NewFromPath(d.Path); err == nil {
			if props, err := bd.GetProperties(); err == nil {
				d.Model, d.Serial, d.WWID, d.Rotational = props.Model, props.Serial, props.WWID, props.Rotational
			}
			bd.Close()
		}
		out = append(out, *d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Classify probes the disk (block device or image file) at path.
func Classify(path string) (*Disk, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return nil, fmt.Errorf("size of %s: %w", path, err)
	}
	d := &Disk{Path: path, Name: filepath.Base(path), Size: uint64(size)}
	info, err := blkid.ProbePath(path, blkid.WithSkipLocking(true))
	if err != nil {
		return nil, fmt.Errorf("probe %s: %w", path, err)
	}
	switch {
	case info.Name == "" && len(info.Parts) == 0:
		zero, err := zeroedEnds(f, size)
		if err != nil {
			return nil, err
		}
		if zero {
			d.Kind = Blank
		} else {
			d.Kind, d.Detail = Foreign, "no known signature but not zeroed"
		}
	case info.Name == "gpt":
		classifyGPT(f, d, info)
	default:
		d.Kind, d.Detail = Foreign, "whole-disk "+info.Name
	}
	return d, nil
}

func classifyGPT(f *os.File, d *Disk, info *blkid.Info) {
	for _, p := range info.Parts {
		if p.PartitionType != nil && strings.EqualFold(p.PartitionType.String(), espType) {
			d.Kind, d.Detail = Boot, "has an EFI system partition"
			return
		}
	}
	if len(info.Parts) != 1 {
		d.Kind, d.Detail = Foreign, fmt.Sprintf("GPT with %d partitions", len(info.Parts))
		return
	}
	p := info.Parts[0]
	if p.PartitionType == nil || *p.PartitionType != provision.PartitionType {
		d.Kind, d.Detail = Foreign, "GPT partition of another type"
		return
	}
	h, err := luks2.ReadHeader(io.NewSectionReader(f, int64(p.PartitionOffset), int64(p.PartitionSize)))
	if err != nil {
		d.Kind, d.Detail = Foreign, "embassy partition without a valid LUKS2 header: "+err.Error()
		return
	}
	if h.Label != luks2.DefaultLabel || h.Subsystem != luks2.DefaultSubsystem {
		d.Kind, d.Detail = Foreign, fmt.Sprintf("LUKS2 volume labelled %q/%q", h.Label, h.Subsystem)
		return
	}
	if err := h.CheckPolicy(); err != nil {
		// Never unlocked, never written: a header anyone could have
		// rewritten (another cipher, sector size, KDF...). Its UUID says
		// which of our disks it claims to be, for the report.
		d.Kind, d.Detail, d.LUKSUUID = Foreign, err.Error(), h.UUID
		return
	}
	d.Kind, d.Detail = Ours, "LUKS2 "+h.UUID
	d.PartitionOffset, d.PartitionIndex, d.LUKSUUID = p.PartitionOffset, p.PartitionIndex, h.UUID
}

func zeroedEnds(f *os.File, size int64) (bool, error) {
	n := min(int64(zeroProbe), size)
	buf := make([]byte, n)
	for _, off := range []int64{0, size - n} {
		if _, err := f.ReadAt(buf, off); err != nil && !errors.Is(err, io.EOF) {
			return false, fmt.Errorf("read %s: %w", f.Name(), err)
		}
		if !bytes.Equal(buf, make([]byte, n)) {
			return false, nil
		}
	}
	return true, nil
}

// Package provision turns a blank disk into one of the appliance's data
// volumes: a GPT with one partition covering the disk (written with
// go-blockdevice's GPT writer), and in it a LUKS2 volume formatted in pure Go
// whose keyslot is opened by the disk's unlock secret.
package provision

import (
	"fmt"
	"os"

	"github.com/google/uuid"
	"github.com/siderolabs/go-blockdevice/v2/block"
	"github.com/siderolabs/go-blockdevice/v2/partitioning/gpt"

	"github.com/dataembassy/embassy/disks/luks2"
)

// PartitionType is the GPT partition type GUID of an embassy data partition.
var PartitionType = uuid.MustParse("8b5e2a4c-6f1d-4e0b-9c3a-0e6d1a5b7c42")

// PartitionName is the GPT partition name of a data partition.
const PartitionName = "embassy-data"

// Result describes a provisioned disk.
type Result struct {
	PartitionOffset uint64
	PartitionSize   uint64
	LUKSUUID        string
}

type offsetWriter struct {
	f   *os.File
	off int64
}

func (w offsetWriter) WriteAt(p []byte, off int64) (int, error) { return w.f.WriteAt(p, w.off+off) }

// Disk partitions and formats the disk (block device or image file) at
// path. The caller must have established that the disk is blank: this
// overwrites its partition table.
func Disk(path string, unlockSecret []byte) (*Result, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_EXCL, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	var dev gpt.Device
	if st.Mode()&os.ModeDevice != 0 {
		bd := block.NewFromFile(f)
		if dev, err = gpt.DeviceFromBlockDevice(bd); err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	} else {
		if dev, err = gpt.DeviceFromFile(f); err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	}
	table, err := gpt.New(dev)
	if err != nil {
		return nil, fmt.Errorf("new GPT on %s: %w", path, err)
	}
	_, part, err := table.AllocatePartition(table.LargestContiguousAllocatable(), PartitionName, PartitionType)
	if err != nil {
		return nil, fmt.Errorf("allocate partition on %s: %w", path, err)
	}
	if err := table.Write(); err != nil {
		return nil, fmt.Errorf("write GPT on %s: %w", path, err)
	}
	sector := uint64(dev.GetSectorSize())
	res := &Result{PartitionOffset: part.FirstLBA * sector, PartitionSize: (part.LastLBA - part.FirstLBA + 1) * sector}
	res.LUKSUUID, err = luks2.Format(offsetWriter{f, int64(res.PartitionOffset)}, res.PartitionSize, unlockSecret, luks2.Options{})
	if err != nil {
		return nil, fmt.Errorf("LUKS2 format of %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("sync %s: %w", path, err)
	}
	return res, nil
}

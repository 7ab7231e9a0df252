package provision

import (
	"bytes"
	"crypto/rand"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/siderolabs/go-blockdevice/v2/partitioning/gpt"

	"github.com/dataembassy/embassy/disks/luks2"
)

func TestDiskLayout(t *testing.T) {
	p := filepath.Join(t.TempDir(), "disk.img")
	f, _ := os.Create(p)
	f.Truncate(128 << 20)
	f.Close()
	secret := make([]byte, 32)
	rand.Read(secret)
	res, err := Disk(p, secret)
	if err != nil {
		t.Fatal(err)
	}
	f, err = os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dev, err := gpt.DeviceFromFile(f)
	if err != nil {
		t.Fatal(err)
	}
	table, err := gpt.Read(dev)
	if err != nil {
		t.Fatal(err)
	}
	parts := table.Partitions()
	if len(parts) != 1 || parts[0].Name != PartitionName || parts[0].TypeGUID != PartitionType {
		t.Fatalf("partitions: %+v", parts)
	}
	// One partition covering the disk, less GPT's own sectors and alignment.
	if res.PartitionSize < 126<<20 || res.PartitionOffset != parts[0].FirstLBA*512 {
		t.Fatalf("partition [%d,+%d)", res.PartitionOffset, res.PartitionSize)
	}
	sec := io.NewSectionReader(f, int64(res.PartitionOffset), int64(res.PartitionSize))
	h, err := luks2.ReadHeader(sec)
	if err != nil {
		t.Fatal(err)
	}
	if h.UUID != res.LUKSUUID || h.Label != luks2.DefaultLabel {
		t.Fatalf("header %+v, result %+v", h, res)
	}
	key, err := luks2.RecoverKey(sec, secret)
	if err != nil || bytes.Equal(key, make([]byte, len(key))) {
		t.Fatalf("recover: %v", err)
	}
	// Provisioning a missing device fails with its name.
	if _, err := Disk(filepath.Join(t.TempDir(), "gone"), secret); err == nil {
		t.Fatal("provisioned a missing disk")
	}
}

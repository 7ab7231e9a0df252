package discover

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/uuid"
	"github.com/siderolabs/go-blockdevice/v2/partitioning/gpt"

	"github.com/dataembassy/embassy/disks/fs"
	"github.com/dataembassy/embassy/disks/luks2"
	"github.com/dataembassy/embassy/disks/provision"
)

func image(t *testing.T, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(size)
	f.Close()
	return p
}

func gptWith(t *testing.T, path string, typ uuid.UUID, n int) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dev, err := gpt.DeviceFromFile(f)
	if err != nil {
		t.Fatal(err)
	}
	table, err := gpt.New(dev)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		if _, _, err := table.AllocatePartition(8<<20, "p", typ); err != nil {
			t.Fatal(err)
		}
	}
	if err := table.Write(); err != nil {
		t.Fatal(err)
	}
}

func TestClassify(t *testing.T) {
	secret := make([]byte, 32)
	rand.Read(secret)

	blank := image(t, 64<<20)

	ours := image(t, 64<<20)
	res, err := provision.Disk(ours, secret)
	if err != nil {
		t.Fatal(err)
	}

	noise := image(t, 64<<20)
	f, _ := os.OpenFile(noise, os.O_RDWR, 0)
	junk := make([]byte, 4096)
	rand.Read(junk)
	f.WriteAt(junk, 40<<20)
	f.WriteAt(junk, 64<<20-4096)
	f.Close()

	foreignLUKS := image(t, 64<<20)
	if _, err := luks2.FormatFile(foreignLUKS, secret, luks2.Options{Label: "someone-else", Subsystem: "x"}); err != nil {
		t.Fatal(err)
	}

	esp := image(t, 64<<20)
	gptWith(t, esp, uuid.MustParse("c12a7328-f81f-11d2-ba4b-00a0c93ec93b"), 1)
	twoParts := image(t, 64<<20)
	gptWith(t, twoParts, provision.PartitionType, 2)
	otherType := image(t, 64<<20)
	gptWith(t, otherType, uuid.MustParse("0fc63daf-8483-4772-8e79-3d69d8477de4"), 1)
	// An embassy partition whose LUKS header is gone (wiped).
	wiped := image(t, 64<<20)
	if _, err := provision.Disk(wiped, secret); err != nil {
		t.Fatal(err)
	}
	wf, _ := os.OpenFile(wiped, os.O_RDWR, 0)
	wf.WriteAt(make([]byte, 64<<10), int64(res.PartitionOffset))
	wf.Close()

	// Ours, with both LUKS2 headers rewritten to a null cipher under
	// valid checksums: foreign, never unlocked.
	nullCipher := image(t, 64<<20)
	if _, err := provision.Disk(nullCipher, secret); err != nil {
		t.Fatal(err)
	}
	nf, _ := os.OpenFile(nullCipher, os.O_RDWR, 0)
	err = luks2.ForgeHeaders(nf, int64(res.PartitionOffset), func(m map[string]any) {
		m["segments"].(map[string]any)["0"].(map[string]any)["encryption"] = "cipher_null-ecb"
	})
	nf.Close()
	if err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name, path string
		want       Kind
	}{
		{"ours with a null-cipher header", nullCipher, Foreign},
		{"blank", blank, Blank},
		{"ours", ours, Ours},
		{"random data", noise, Foreign},
		{"LUKS2 of someone else", foreignLUKS, Foreign},
		{"boot disk", esp, Boot},
		{"two partitions", twoParts, Foreign},
		{"linux partition", otherType, Foreign},
		{"embassy partition without header", wiped, Foreign},
	}
	if _, err := exec.LookPath(fs.Mkfs); err == nil {
		ext4 := image(t, 64<<20)
		if err := fs.MakeExt4(context.Background(), ext4, "data"); err != nil {
			t.Fatal(err)
		}
		cases = append(cases, struct {
			name, path string
			want       Kind
		}{"whole-disk ext4", ext4, Foreign})
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d, err := Classify(c.path)
			if err != nil {
				t.Fatal(err)
			}
			if d.Kind != c.want {
				t.Fatalf("kind %s (%s), want %s", d.Kind, d.Detail, c.want)
			}
		})
	}

	if d, err := Classify(nullCipher); err != nil || !strings.Contains(d.Detail, luks2.ErrPolicy.Error()) || !strings.Contains(d.Detail, "cipher_null") {
		t.Fatalf("null-cipher disk refused for the wrong reason: %+v %v", d, err)
	}
	d, err := Classify(ours)
	if err != nil {
		t.Fatal(err)
	}
	if d.LUKSUUID != res.LUKSUUID || d.PartitionOffset != res.PartitionOffset || d.PartitionIndex != 1 {
		t.Fatalf("ours: %+v, provisioned %+v", d, res)
	}
	// The provisioned volume opens with the secret at the partition offset.
	of, _ := os.Open(ours)
	defer of.Close()
	sec := newSection(of, res.PartitionOffset, res.PartitionSize)
	key, err := luks2.RecoverKey(sec, secret)
	if err != nil {
		t.Fatal(err)
	}
	if len(key) != luks2.VolumeKeySize || bytes.Equal(key, make([]byte, len(key))) {
		t.Fatal("bad volume key")
	}
	// blkid (util-linux), a reader we did not write, sees our GPT.
	if _, err := exec.LookPath("blkid"); err == nil {
		out, err := exec.Command("blkid", "-p", "-o", "value", "-s", "PTTYPE", ours).CombinedOutput()
		if err != nil || string(bytes.TrimSpace(out)) != "gpt" {
			t.Fatalf("blkid: %v %q", err, out)
		}
	}
}

func TestListSkipsVirtualDevices(t *testing.T) {
	sys, dev := t.TempDir(), t.TempDir()
	for _, n := range []string{"loop0", "dm-1", "ram0", "vda"} {
		os.Mkdir(filepath.Join(sys, n), 0o755)
	}
	img := image(t, 32<<20)
	os.Rename(img, filepath.Join(dev, "vda"))
	disks, err := List(sys, dev)
	if err != nil {
		t.Fatal(err)
	}
	if len(disks) != 1 || disks[0].Name != "vda" || disks[0].Kind != Blank {
		t.Fatalf("List = %+v", disks)
	}
}

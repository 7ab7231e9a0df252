package discover

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/dataembassy/embassy/disks/luks2"
	"github.com/dataembassy/embassy/disks/provision"
)

const (
	fuzzDiskSize = 20 << 20
	sectorSize   = 512
	// gptArea is what the fuzzed bytes may cover: the protective MBR, the
	// primary GPT header and its 128 entries.
	gptArea = 34 * sectorSize
)

// provisionedBlocks returns the non-zero 4 KiB blocks of a freshly
// provisioned disk that Classify can read (the GPTs and the LUKS2
// headers, not the keyslot material), and its partition offset.
func provisionedBlocks(t testing.TB) (map[int64][]byte, int64) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "ours.img")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, fuzzDiskSize); err != nil {
		t.Fatal(err)
	}
	res, err := provision.Disk(p, []byte("unlock secret"))
	if err != nil {
		t.Fatal(err)
	}
	img, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	off := int64(res.PartitionOffset)
	blocks := map[int64][]byte{}
	zero := make([]byte, 4096)
	for at := int64(0); at < int64(len(img)); at += 4096 {
		b := img[at : at+4096]
		if bytes.Equal(b, zero) || (at >= off+2*luks2.DefaultHdrSize && at < fuzzDiskSize-1<<20) {
			continue
		}
		blocks[at] = b
	}
	return blocks, off
}

// fixGPT recomputes the CRCs of the primary GPT header and of its entry
// array, when the header's fields let the entries be found, so that
// fuzzed headers and entries get past the checksums.
func fixGPT(img *os.File) {
	hdr := make([]byte, sectorSize)
	if _, err := img.ReadAt(hdr, sectorSize); err != nil {
		return
	}
	le := binary.LittleEndian
	entriesLBA, n, size := le.Uint64(hdr[72:]), le.Uint32(hdr[80:]), le.Uint32(hdr[84:])
	if n > 0 && n <= 128 && size == 128 && entriesLBA < fuzzDiskSize/sectorSize {
		entries := make([]byte, n*size)
		if _, err := img.ReadAt(entries, int64(entriesLBA)*sectorSize); err == nil {
			le.PutUint32(hdr[88:], crc32.ChecksumIEEE(entries))
		}
	}
	le.PutUint32(hdr[16:], 0)
	le.PutUint32(hdr[16:], crc32.ChecksumIEEE(hdr[:92]))
	img.WriteAt(hdr, sectorSize)
}

// fingerprint is what a write to the disk image would change: its size and
// modification time, and the checksum of what Classify reads.
func fingerprint(t *testing.T, p string, partOffset int64) [4]int64 {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := crc32.NewIEEE()
	for _, r := range [][2]int64{{0, 1 << 20}, {partOffset, 2 * luks2.DefaultHdrSize}, {fuzzDiskSize - 1<<20, 1 << 20}} {
		io.Copy(h, io.NewSectionReader(f, r[0], r[1]))
	}
	return [4]int64{st.Size(), st.ModTime().UnixNano(), int64(h.Sum32()), int64(st.Mode())}
}

// FuzzClassify classifies disk images made from a provisioned disk of
// ours whose first sectors (protective MBR, primary GPT header, entries)
// are overwritten with fuzzed bytes, their GPT checksums recomputed or
// not, and whose LUKS2 metadata is replaced by fuzzed JSON under valid
// header checksums. It proves that Classify never panics, never writes to
// the image, and classifies a disk as ours only if the LUKS2 header at the
// partition it reports reads, carries our label and passes the policy
// check.
func FuzzClassify(f *testing.F) {
	blocks, partOffset := provisionedBlocks(f)
	var hdr []byte
	for at := int64(0); at < gptArea; at += 4096 {
		b := blocks[at]
		if b == nil {
			b = make([]byte, 4096)
		}
		hdr = append(hdr, b...)
	}
	hdr = hdr[:gptArea]
	js := func(edit func(m map[string]any)) []byte {
		// The primary header's JSON area follows its 4 KiB binary header.
		b := bytes.Join([][]byte{blocks[partOffset+4096], blocks[partOffset+8192], blocks[partOffset+12288]}, nil)
		end := bytes.IndexByte(b, 0)
		var m map[string]any
		if err := json.Unmarshal(b[:end], &m); err != nil {
			f.Fatal(err)
		}
		if edit != nil {
			edit(m)
		}
		out, _ := json.Marshal(m)
		return out
	}
	f.Add(hdr, false, []byte(nil))
	f.Add(hdr, true, js(nil))
	f.Add(hdr, true, js(func(m map[string]any) {
		m["segments"].(map[string]any)["0"].(map[string]any)["encryption"] = "cipher_null-ecb"
	}))
	f.Add(hdr[:2*sectorSize], true, []byte(nil))
	f.Add([]byte{}, false, []byte(nil))

	dir := f.TempDir()
	p := filepath.Join(dir, "disk.img")
	f.Fuzz(func(t *testing.T, first []byte, fixChecksums bool, metadata []byte) {
		img, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		img.Truncate(fuzzDiskSize)
		for at, b := range blocks {
			img.WriteAt(b, at)
		}
		img.WriteAt(first[:min(len(first), gptArea)], 0)
		if fixChecksums {
			fixGPT(img)
		}
		var m map[string]any
		if json.Unmarshal(metadata, &m) == nil && m != nil {
			luks2.ForgeHeaders(img, partOffset, func(old map[string]any) {
				clear(old)
				for k, v := range m {
					old[k] = v
				}
			})
		}
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
		before := fingerprint(t, p, partOffset)

		d, err := Classify(p)

		if after := fingerprint(t, p, partOffset); after != before {
			t.Fatalf("Classify changed the image: %v, was %v", after, before)
		}
		if err != nil || d.Kind != Ours {
			return
		}
		if d.PartitionOffset >= fuzzDiskSize {
			t.Fatalf("ours at offset %d, past the end of the disk", d.PartitionOffset)
		}
		img, err = os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		h, err := luks2.ReadHeader(io.NewSectionReader(img, int64(d.PartitionOffset), fuzzDiskSize-int64(d.PartitionOffset)))
		if err != nil {
			t.Fatalf("classified as ours with no readable LUKS2 header at %d: %v", d.PartitionOffset, err)
		}
		if err := h.CheckPolicy(); err != nil || h.Label != luks2.DefaultLabel || h.Subsystem != luks2.DefaultSubsystem || h.UUID != d.LUKSUUID {
			t.Fatalf("classified as ours with a header that fails the policy (%v) or is not ours: %q/%q %s", err, h.Label, h.Subsystem, h.UUID)
		}
	})
}

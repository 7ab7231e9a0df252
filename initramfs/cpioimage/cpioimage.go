// Package cpioimage assembles a reproducible newc cpio archive, the format
// the kernel unpacks as its initramfs, and compresses it with zstd. Entries
// are sorted by path, parent directories are created implicitly, and every
// timestamp, owner and inode number is fixed, so the same inputs always give
// the same bytes.
package cpioimage

import (
	"bytes"
	"fmt"
	"io"
	"path"
	"sort"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/u-root/u-root/pkg/cpio"
)

// Archive is an in-memory set of initramfs entries keyed by path.
type Archive struct {
	entries map[string]cpio.Record
}

// New returns an empty archive.
func New() *Archive {
	return &Archive{entries: map[string]cpio.Record{}}
}

func clean(name string) (string, error) {
	n := cpio.Normalize(name)
	if n == "." || n == "" || strings.HasPrefix(n, "../") || n == ".." {
		return "", fmt.Errorf("initramfs path %q is not inside the archive", name)
	}
	return n, nil
}

func (a *Archive) add(r cpio.Record) error {
	name, err := clean(r.Name)
	if err != nil {
		return err
	}
	r.Name = name
	if old, ok := a.entries[name]; ok && !(old.Mode&cpio.S_IFMT == cpio.S_IFDIR && r.Mode&cpio.S_IFMT == cpio.S_IFDIR) {
		return fmt.Errorf("initramfs path %q added twice", name)
	}
	a.entries[name] = r
	for dir := path.Dir(name); dir != "."; dir = path.Dir(dir) {
		if _, ok := a.entries[dir]; !ok {
			a.entries[dir] = cpio.Directory(dir, 0o755)
		}
	}
	return nil
}

// File adds a regular file.
func (a *Archive) File(name string, content []byte, perm uint64) error {
	return a.add(cpio.StaticRecord(content, cpio.Info{Name: name, Mode: cpio.S_IFREG | perm&0o7777}))
}

// Dir adds a directory.
func (a *Archive) Dir(name string, perm uint64) error {
	return a.add(cpio.Directory(name, perm&0o7777))
}

// Symlink adds a symbolic link.
func (a *Archive) Symlink(name, target string) error {
	return a.add(cpio.Symlink(name, target))
}

// CharDev adds a character device node.
func (a *Archive) CharDev(name string, perm, major, minor uint64) error {
	return a.add(cpio.CharDev(name, perm&0o7777, major, minor))
}

// Has reports whether name is in the archive.
func (a *Archive) Has(name string) bool {
	n, err := clean(name)
	if err != nil {
		return false
	}
	_, ok := a.entries[n]
	return ok
}

// Len returns the number of entries.
func (a *Archive) Len() int { return len(a.entries) }

// WriteCPIO writes the uncompressed newc archive.
func (a *Archive) WriteCPIO(w io.Writer) error {
	names := make([]string, 0, len(a.entries))
	for n := range a.entries {
		names = append(names, n)
	}
	sort.Strings(names)
	cw := cpio.Newc.Writer(w)
	for i, n := range names {
		r := cpio.MakeReproducible(a.entries[n])
		r.Ino = uint64(i + 1)
		r.NLink = 1
		if err := cw.WriteRecord(r); err != nil {
			return fmt.Errorf("write initramfs entry %s: %w", n, err)
		}
	}
	if err := cpio.WriteTrailer(cw); err != nil {
		return fmt.Errorf("write initramfs trailer: %w", err)
	}
	return nil
}

// Compress returns data compressed with zstd at a fixed level in a single
// thread, which makes the output a pure function of the input.
func Compress(data []byte) ([]byte, error) {
	enc, err := zstd.NewWriter(nil,
		zstd.WithEncoderLevel(zstd.SpeedBetterCompression),
		zstd.WithEncoderConcurrency(1),
		zstd.WithEncoderCRC(true),
		zstd.WithZeroFrames(true))
	if err != nil {
		return nil, fmt.Errorf("zstd encoder: %w", err)
	}
	defer enc.Close()
	return enc.EncodeAll(data, nil), nil
}

// Decompress reverses Compress.
func Decompress(data []byte) ([]byte, error) {
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(1<<30))
	if err != nil {
		return nil, fmt.Errorf("zstd decoder: %w", err)
	}
	defer dec.Close()
	out, err := dec.DecodeAll(data, nil)
	if err != nil {
		return nil, fmt.Errorf("decompress initramfs: %w", err)
	}
	return out, nil
}

// Build writes the archive and compresses it.
func (a *Archive) Build() ([]byte, error) {
	var buf bytes.Buffer
	if err := a.WriteCPIO(&buf); err != nil {
		return nil, err
	}
	return Compress(buf.Bytes())
}

// ReadFiles parses an uncompressed newc archive and returns its records in
// order; file contents are read fully. It is used to inspect and to re-pack
// images in tests and by `mkimage verify`.
func ReadFiles(data []byte) ([]cpio.Record, error) {
	rr := cpio.Newc.Reader(bytes.NewReader(data))
	recs, err := cpio.ReadAllRecords(rr)
	if err != nil {
		return nil, fmt.Errorf("read initramfs cpio: %w", err)
	}
	return recs, nil
}

// Contents returns the content of a record.
func Contents(r cpio.Record) ([]byte, error) {
	if r.ReaderAt == nil {
		return nil, nil
	}
	b, err := io.ReadAll(io.NewSectionReader(r.ReaderAt, 0, int64(r.FileSize)))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", r.Name, err)
	}
	return b, nil
}

// FromRecords rebuilds an archive from records read with ReadFiles, so a
// test can change one file and re-pack the rest unchanged.
func FromRecords(recs []cpio.Record) (*Archive, error) {
	a := New()
	for _, r := range recs {
		if r.Name == cpio.Trailer {
			continue
		}
		b, err := Contents(r)
		if err != nil {
			return nil, err
		}
		rec := cpio.StaticRecord(b, r.Info)
		if r.Mode&cpio.S_IFMT == cpio.S_IFDIR || r.Mode&cpio.S_IFMT == cpio.S_IFCHR {
			rec = cpio.Record{Info: r.Info}
		}
		if err := a.add(rec); err != nil {
			return nil, err
		}
	}
	return a, nil
}

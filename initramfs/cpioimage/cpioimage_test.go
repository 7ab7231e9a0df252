package cpioimage

import (
	"bytes"
	"os/exec"
	"strings"
	"testing"
)

func sampleArchive(t *testing.T, reverse bool) *Archive {
	t.Helper()
	a := New()
	steps := []func() error{
		func() error { return a.File("etc/embassy/config.json", []byte("{}\n"), 0o444) },
		func() error { return a.File("/init", []byte("#!binary"), 0o755) },
		func() error { return a.Symlink("sbin/mkfs.ext4", "mke2fs") },
		func() error { return a.CharDev("dev/console", 0o600, 5, 1) },
		func() error { return a.Dir("tmp", 0o1777) },
	}
	if reverse {
		for i, j := 0, len(steps)-1; i < j; i, j = i+1, j-1 {
			steps[i], steps[j] = steps[j], steps[i]
		}
	}
	for _, s := range steps {
		if err := s(); err != nil {
			t.Fatal(err)
		}
	}
	return a
}

func TestReproducible(t *testing.T) {
	a, err := sampleArchive(t, false).Build()
	if err != nil {
		t.Fatal(err)
	}
	b, err := sampleArchive(t, true).Build()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Fatal("the same entries added in another order give different bytes")
	}
}

func TestRoundTripAndGNUcpio(t *testing.T) {
	var buf bytes.Buffer
	if err := sampleArchive(t, false).WriteCPIO(&buf); err != nil {
		t.Fatal(err)
	}
	recs, err := ReadFiles(buf.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, r := range recs {
		names = append(names, r.Name)
	}
	want := "dev dev/console etc etc/embassy etc/embassy/config.json init sbin sbin/mkfs.ext4 tmp"
	if got := strings.Join(names, " "); got != want {
		t.Fatalf("entries %q, want %q", got, want)
	}
	// Re-packing what was read gives the same archive.
	again, err := FromRecords(recs)
	if err != nil {
		t.Fatal(err)
	}
	var buf2 bytes.Buffer
	if err := again.WriteCPIO(&buf2); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), buf2.Bytes()) {
		t.Fatal("read and re-pack changed the archive")
	}
	// GNU cpio, a reader we did not write, lists the same entries.
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Skip("GNU cpio not installed")
	}
	cmd := exec.Command("cpio", "-t", "--quiet")
	cmd.Stdin = bytes.NewReader(buf.Bytes())
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("cpio -t: %v", err)
	}
	if got := strings.Join(strings.Fields(string(out)), " "); got != want {
		t.Fatalf("GNU cpio lists %q, want %q", got, want)
	}
}

func TestCompressRoundTrip(t *testing.T) {
	data := bytes.Repeat([]byte("embassy "), 10000)
	z, err := Compress(data)
	if err != nil {
		t.Fatal(err)
	}
	z2, _ := Compress(data)
	if !bytes.Equal(z, z2) {
		t.Fatal("compression is not deterministic")
	}
	back, err := Decompress(z)
	if err != nil || !bytes.Equal(back, data) {
		t.Fatalf("round trip failed: %v", err)
	}
	if _, err := Decompress([]byte("not zstd")); err == nil {
		t.Fatal("garbage decompressed")
	}
}

func TestRejectsBadPaths(t *testing.T) {
	a := New()
	for _, p := range []string{"", "/", "..", "../etc/passwd"} {
		if err := a.File(p, nil, 0o644); err == nil {
			t.Errorf("path %q accepted", p)
		}
	}
	if err := a.File("x", nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := a.File("x", nil, 0o644); err == nil {
		t.Error("duplicate path accepted")
	}
}

func FuzzReadFiles(f *testing.F) {
	var buf bytes.Buffer
	a := New()
	a.File("a/b", []byte("hello"), 0o644)
	a.WriteCPIO(&buf)
	f.Add(buf.Bytes())
	f.Fuzz(func(t *testing.T, b []byte) {
		recs, err := ReadFiles(b)
		if err != nil {
			return
		}
		for _, r := range recs {
			if r.FileSize < 1<<20 {
				Contents(r)
			}
		}
	})
}

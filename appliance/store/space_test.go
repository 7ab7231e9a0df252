package store

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// smallDisk mounts a tmpfs of size bytes for the test, a disk that fills
// up for real (ENOSPC from the kernel), or skips where mounting is not
// allowed.
func smallDisk(t *testing.T, size int) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size="+strconv.Itoa(size)); err != nil {
		t.Skipf("cannot mount a small tmpfs here (%v): needs root", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	return filepath.Join(dir, "disk")
}

// TestDiskFullFailsNoDisk fills one mirror (a 1 MiB tmpfs) while the
// other has room: the write that does not fit is refused with ErrFull and
// stored nowhere, no disk fails, the store is not degraded, every object
// acknowledged before reads back intact from both disks, and once space is
// freed writes are acknowledged again.
func TestDiskFullFailsNoDisk(t *testing.T) {
	small := smallDisk(t, 1<<20)
	s, err := Open(quiet(), []DiskSpec{{ID: "a", Root: small}, {ID: "b", Root: filepath.Join(t.TempDir(), "disk")}})
	if err != nil {
		t.Fatal(err)
	}
	acked := map[string][]byte{}
	var refused string
	for i := 0; i < 64; i++ {
		name, data := object(t, 64<<10)
		_, err := s.Put(ns, name, data)
		for _, d := range mustStatus(s) {
			if d.State == Failed {
				t.Fatalf("write %d failed disk %s: %s", i, d.ID, d.Reason)
			}
		}
		if err == nil {
			acked[name] = data
			continue
		}
		if !errors.Is(err, ErrFull) {
			t.Fatalf("write %d: %v, want ErrFull", i, err)
		}
		refused = name
		break
	}
	if refused == "" {
		t.Fatal("64 objects of 64 KiB fitted on a 1 MiB disk: the disk never filled")
	}
	if len(acked) == 0 {
		t.Fatal("nothing was acknowledged before the disk filled")
	}
	disks, degraded := s.Status()
	if degraded {
		t.Fatalf("a full disk degraded the store: %+v", disks)
	}
	for _, d := range disks {
		if d.State != Healthy {
			t.Errorf("disk %s is %s (%s) after filling up", d.ID, d.State, d.Reason)
		}
		if d.Full != (d.ID == "a") {
			t.Errorf("disk %s full = %v", d.ID, d.Full)
		}
	}
	if _, ok := s.Has(ns, refused); ok {
		t.Error("the refused object is stored")
	}
	for _, d := range s.disks {
		if _, err := os.Stat(copyOn(d.root, refused)); err == nil {
			t.Errorf("a copy of the refused object is on disk %s", d.id)
		}
	}
	for name, want := range acked {
		got, err := s.Get(ns, name)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("read of an acknowledged object after the disk filled: %v", err)
		}
		for _, d := range s.disks {
			b, err := os.ReadFile(copyOn(d.root, name))
			if err != nil || !bytes.Equal(b, want) {
				t.Fatalf("copy on %s: %v", d.id, err)
			}
		}
	}

	// Space comes back (an operator, or a prune): writes go on.
	var victim string
	for name := range acked {
		victim = name
		break
	}
	for _, d := range s.disks {
		os.Remove(copyOn(d.root, victim))
	}
	name, data := object(t, 16<<10)
	if _, err := s.Put(ns, name, data); err != nil {
		t.Fatalf("write after space was freed: %v", err)
	}
	for _, d := range mustStatus(s) {
		if d.Full {
			t.Errorf("disk %s still reported full after a write succeeded", d.ID)
		}
	}
}

func mustStatus(s *Store) []DiskStatus {
	d, _ := s.Status()
	return d
}

// TestQuotaBoundsRepository: a repository with a quota takes no more than
// it, counted from what is on disk when the quota is set; storing an object
// it already holds costs nothing; another repository is not affected;
// deleting gives the space back.
func TestQuotaBoundsRepository(t *testing.T) {
	s, roots := newStore(t, 2)
	first, firstData := object(t, 40<<10)
	if _, err := s.Put(ns, first, firstData); err != nil {
		t.Fatal(err)
	}
	// The quota is set on a store that already holds 40 KiB of population.
	if err := s.SetQuotas(map[string]int64{"population": 100 << 10}); err != nil {
		t.Fatal(err)
	}
	if used, _ := s.Usage(); used["population"] != 40<<10 {
		t.Fatalf("counted %d bytes of population, want %d", used["population"], 40<<10)
	}
	second, secondData := object(t, 40<<10)
	if _, err := s.Put(ns, second, secondData); err != nil {
		t.Fatal(err)
	}
	third, thirdData := object(t, 40<<10)
	if _, err := s.Put(ns, third, thirdData); !errors.Is(err, ErrQuota) {
		t.Fatalf("120 KiB into a 100 KiB quota: %v", err)
	}
	for _, r := range roots {
		if _, err := os.Stat(copyOn(r, third)); err == nil {
			t.Fatal("an object over the quota was stored")
		}
	}
	if _, err := s.Put(ns, first, firstData); err != nil {
		t.Fatalf("storing an object the repository holds already: %v", err)
	}
	other, otherData := object(t, 200<<10)
	if _, err := s.Put("cadastre/data", other, otherData); err != nil {
		t.Fatalf("a repository without a quota: %v", err)
	}
	lock, lockData := object(t, 1<<10)
	if _, err := s.Put("population/locks", lock, lockData); err != nil {
		t.Fatalf("a small lock within the quota: %v", err)
	}
	if err := s.Delete(ns, second); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Put(ns, third, thirdData); err != nil {
		t.Fatalf("after a delete gave space back: %v", err)
	}
	for _, bad := range []map[string]int64{{"population": 0}, {"population": -5}} {
		if err := s.SetQuotas(bad); err == nil {
			t.Errorf("quota %v accepted", bad)
		}
	}
}

package store

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dataembassy/embassy/appliance/metricstest"
	"github.com/dataembassy/embassy/appliance/objref"
	"golang.org/x/sys/unix"
)

const ns = "population/data"

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func newStore(t testing.TB, n int) (*Store, []string) {
	t.Helper()
	var specs []DiskSpec
	var roots []string
	for i := 0; i < n; i++ {
		r := filepath.Join(t.TempDir(), "disk")
		roots = append(roots, r)
		specs = append(specs, DiskSpec{ID: string(rune('a' + i)), Root: r})
	}
	s, err := Open(quiet(), specs)
	if err != nil {
		t.Fatal(err)
	}
	return s, roots
}

func object(t testing.TB, size int) (string, []byte) {
	t.Helper()
	b := make([]byte, size)
	rand.Read(b)
	return objref.Digest(b), b
}

func copyOn(root, name string) string { return objectPath(root, ns, name, name) }

func TestMirroredWrites(t *testing.T) {
	s, roots := newStore(t, 2)
	name, data := object(t, 100000)
	disks, err := s.Put(ns, name, data)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(disks, ",") != "a,b" {
		t.Fatalf("written to %v", disks)
	}
	for _, r := range roots {
		b, err := os.ReadFile(copyOn(r, name))
		if err != nil || !bytes.Equal(b, data) {
			t.Fatalf("copy on %s: %v", r, err)
		}
		if ents, _ := os.ReadDir(filepath.Join(r, "tmp")); len(ents) != 0 {
			t.Fatalf("temp files left: %v", ents)
		}
	}
	got, err := s.Get(ns, name)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("Get: %v", err)
	}
	// Same bytes again: fine. Named objects: conflict on different bytes.
	if _, err := s.Put(ns, name, data); err != nil {
		t.Fatalf("idempotent put: %v", err)
	}
	if _, err := s.Put("population/config", "config", []byte("v1")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Put("population/config", "config", []byte("v1")); err != nil {
		t.Fatalf("same named object again: %v", err)
	}
	if _, err := s.Put("population/config", "config", []byte("v2")); !errors.Is(err, ErrConflict) {
		t.Fatalf("overwrite with different bytes: %v", err)
	}
	if b, err := s.Get("population/config", "config"); err != nil || string(b) != "v1" {
		t.Fatalf("named object: %q %v", b, err)
	}
	list, err := s.List(ns)
	if err != nil || len(list) != 1 || list[0].Name != name || list[0].Size != int64(len(data)) {
		t.Fatalf("List = %+v, %v", list, err)
	}
	if err := s.Delete(ns, name); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ns, name); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after delete: %v", err)
	}
}

func TestRejectsBadInput(t *testing.T) {
	s, roots := newStore(t, 2)
	name, data := object(t, 1000)
	if _, err := s.Put(ns, name, append(data, 1)); !errors.Is(err, ErrHashMismatch) {
		t.Errorf("wrong hash: %v", err)
	}
	for _, c := range []struct{ ns, name string }{
		{"../etc/data", name}, {"population", name}, {"a/b/c", name}, {"Pop/data", name},
		{ns, "../../x"}, {ns, strings.ToUpper(name)}, {ns, name[:63]}, {ns, ""}, {ns, "config~x"},
	} {
		if _, err := s.Put(c.ns, c.name, data); !errors.Is(err, ErrInvalidName) {
			t.Errorf("Put(%q, %q): %v", c.ns, c.name, err)
		}
	}
	// Nothing was written anywhere.
	for _, r := range roots {
		ents, _ := os.ReadDir(filepath.Join(r, "objects"))
		if len(ents) != 0 {
			t.Fatalf("bad input left files: %v", ents)
		}
	}
}

func TestBitrotHealedByReadAndScrub(t *testing.T) {
	s, roots := newStore(t, 2)
	var names []string
	for i := 0; i < 20; i++ {
		n, d := object(t, 5000+i)
		if _, err := s.Put(ns, n, d); err != nil {
			t.Fatal(err)
		}
		names = append(names, n)
	}
	flip := func(path string) {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		b[len(b)/2] ^= 0x40
		os.WriteFile(path, b, 0o600)
	}
	// A read served by a bad first copy heals it.
	flip(copyOn(roots[0], names[0]))
	got, err := s.Get(ns, names[0])
	if err != nil || objref.Digest(got) != names[0] {
		t.Fatalf("read with one bad copy: %v", err)
	}
	if b, _ := os.ReadFile(copyOn(roots[0], names[0])); objref.Digest(b) != names[0] {
		t.Fatal("bad copy not healed by the read")
	}
	// The scrubber finds and heals bad copies on either disk, and missing ones.
	flip(copyOn(roots[1], names[1]))
	flip(copyOn(roots[0], names[2]))
	os.Remove(copyOn(roots[1], names[3]))
	var progressed bool
	rep, err := s.Scrub(context.Background(), func(p Progress) { progressed = p.Total == 20 })
	if err != nil {
		t.Fatal(err)
	}
	if rep.Objects != 20 || rep.Healed != 3 || rep.Unrecoverable != 0 || !progressed {
		t.Fatalf("scrub report %+v, progress %v", rep, progressed)
	}
	for _, n := range names {
		for _, r := range roots {
			if b, err := os.ReadFile(copyOn(r, n)); err != nil || objref.Digest(b) != n {
				t.Fatalf("copy of %s on %s still bad", n, r)
			}
		}
	}
	// Both copies bad: a clear error.
	flip(copyOn(roots[0], names[4]))
	flip(copyOn(roots[1], names[4]))
	if _, err := s.Get(ns, names[4]); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("both copies bad: %v", err)
	}
	if _, err := s.Scrub(context.Background(), nil); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("scrub with an unrecoverable object: %v", err)
	}
	disks, degraded := s.Status()
	if degraded || disks[0].ReadErrors == 0 || disks[0].Healed == 0 {
		t.Fatalf("status %+v degraded=%v", disks, degraded)
	}
	m := metricstest.Scrape(t, s.Collectors()...)
	if !strings.Contains(m, `embassy_store_disk_healed_total{disk="a"}`) {
		t.Fatalf("metrics:\n%s", m)
	}
}

// readOnly makes dir read-only, for root too (a read-only bind mount).
func readOnly(t *testing.T, dir string) {
	t.Helper()
	if os.Geteuid() != 0 {
		if err := os.Chmod(dir, 0o555); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Chmod(dir, 0o755) })
		return
	}
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		t.Skipf("bind mount: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	if err := unix.Mount("", dir, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		t.Skipf("read-only remount: %v", err)
	}
}

func TestDiskVanishesMidStream(t *testing.T) {
	for _, how := range []string{"removed", "read-only"} {
		t.Run(how, func(t *testing.T) {
			s, roots := newStore(t, 2)
			var acked []string
			for i := 0; i < 50; i++ {
				if i == 20 {
					switch how {
					case "removed":
						os.RemoveAll(roots[1])
					case "read-only":
						readOnly(t, roots[1])
					}
				}
				n, d := object(t, 3000)
				disks, err := s.Put(ns, n, d)
				if err != nil {
					t.Fatalf("put %d with one disk left: %v", i, err)
				}
				if i >= 20 && strings.Join(disks, ",") != "a" {
					t.Fatalf("put %d acknowledged on %v after disk b went", i, disks)
				}
				acked = append(acked, n)
			}
			status, degraded := s.Status()
			if !degraded || status[1].State != Failed || status[1].Reason == "" {
				t.Fatalf("status after losing b: %+v", status)
			}
			for _, n := range acked {
				if _, err := s.Get(ns, n); err != nil {
					t.Fatalf("acknowledged object %s unreadable: %v", n, err)
				}
			}
			// Losing the last disk: writes are refused, not acknowledged.
			os.RemoveAll(roots[0])
			n, d := object(t, 10)
			if _, err := s.Put(ns, n, d); !errors.Is(err, ErrNoHealthyDisk) {
				t.Fatalf("put with no healthy disk: %v", err)
			}
		})
	}
}

func TestResync(t *testing.T) {
	s, roots := newStore(t, 2)
	var names []string
	for i := 0; i < 30; i++ {
		n, d := object(t, 2000)
		if _, err := s.Put(ns, n, d); err != nil {
			t.Fatal(err)
		}
		names = append(names, n)
	}
	os.RemoveAll(roots[1])
	if _, err := s.Put(ns, names[0], mustGet(t, s, names[0])); err != nil {
		t.Fatal(err)
	}
	if err := s.RemoveDisk("b"); err != nil {
		t.Fatal(err)
	}
	newRoot := filepath.Join(t.TempDir(), "replacement")
	if err := s.AddDisk(DiskSpec{ID: "c", Root: newRoot}); err != nil {
		t.Fatal(err)
	}
	// While syncing, the new disk gets new writes but serves no reads.
	n, d := object(t, 1234)
	disks, err := s.Put(ns, n, d)
	if err != nil || strings.Join(disks, ",") != "a,c" {
		t.Fatalf("put during resync: %v %v", disks, err)
	}
	names = append(names, n)
	os.Remove(copyOn(roots[0], names[5]))
	if _, err := s.Get(ns, names[5]); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a syncing disk served a read: %v", err)
	}
	n5 := names[5]
	names = append(names[:5], names[6:]...)
	var last Progress
	rep, err := s.Resync(context.Background(), "c", func(p Progress) { last = p })
	if err != nil {
		t.Fatal(err)
	}
	if rep.Healed != 29 || last.Done != last.Total || last.Phase != "resync" {
		t.Fatalf("resync report %+v, last progress %+v", rep, last)
	}
	status, degraded := s.Status()
	if degraded || status[1].ID != "c" || status[1].State != Healthy {
		t.Fatalf("status after resync: %+v", status)
	}
	for _, n := range names {
		for _, r := range []string{roots[0], newRoot} {
			if b, err := os.ReadFile(copyOn(r, n)); err != nil || objref.Digest(b) != n {
				t.Fatalf("%s missing or bad on %s after resync", n, r)
			}
		}
	}
	_ = n5
}

func mustGet(t *testing.T, s *Store, name string) []byte {
	t.Helper()
	b, err := s.Get(ns, name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestEveryCopyBadFetchedFromPeer: when no local copy verifies, the
// fallback (a peer) supplies the object; it is checked and rewritten on
// every disk. A fallback with wrong content heals nothing.
func TestEveryCopyBadFetchedFromPeer(t *testing.T) {
	cases := []struct {
		name    string
		peer    func(good []byte) ([]byte, error)
		healed  bool
		wantErr error
	}{
		{"peer has it", func(good []byte) ([]byte, error) { return good, nil }, true, nil},
		{"peer sends other bytes", func(good []byte) ([]byte, error) { return []byte("forged"), nil }, false, ErrCorrupt},
		{"peer unreachable", func(good []byte) ([]byte, error) { return nil, errors.New("no path") }, false, ErrCorrupt},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, roots := newStore(t, 2)
			name, data := object(t, 10000)
			if _, err := s.Put(ns, name, data); err != nil {
				t.Fatal(err)
			}
			for _, r := range roots {
				os.WriteFile(copyOn(r, name), []byte("rotten"), 0o600)
			}
			s.SetFallback(func(gotNS, gotName string) ([]byte, error) {
				if gotNS != ns || gotName != name {
					t.Errorf("fallback asked for %s/%s", gotNS, gotName)
				}
				return tc.peer(data)
			})
			got, err := s.Get(ns, name)
			if !errors.Is(err, tc.wantErr) || (err == nil && !bytes.Equal(got, data)) {
				t.Fatalf("Get: %v", err)
			}
			for _, r := range roots {
				b, _ := os.ReadFile(copyOn(r, name))
				if bytes.Equal(b, data) != tc.healed {
					t.Fatalf("copy on %s healed=%v, want %v", r, !tc.healed, tc.healed)
				}
			}
			// The scrubber takes the same way out.
			for _, r := range roots {
				os.WriteFile(copyOn(r, name), []byte("rotten again"), 0o600)
			}
			rep, err := s.Scrub(context.Background(), nil)
			if tc.healed && (err != nil || rep.Healed != 2 || rep.Unrecoverable != 0) {
				t.Fatalf("scrub: %+v %v", rep, err)
			}
			if !tc.healed && (rep.Unrecoverable != 1 || !errors.Is(err, ErrCorrupt)) {
				t.Fatalf("scrub: %+v %v", rep, err)
			}
		})
	}
}

// TestUnavailableDiskNeverTouched: a disk that is the store's but refused
// (its header, say) starts failed, makes the store degraded, and is never
// written, read or scrubbed, even though its directory exists.
func TestUnavailableDiskNeverTouched(t *testing.T) {
	good := filepath.Join(t.TempDir(), "disk")
	refused := filepath.Join(t.TempDir(), "disk")
	if err := os.MkdirAll(refused, 0o700); err != nil {
		t.Fatal(err)
	}
	s, err := Open(quiet(), []DiskSpec{{ID: "a", Root: good}, {ID: "b", Root: refused, Unavailable: "refused: LUKS2 header outside the policy"}})
	if err != nil {
		t.Fatal(err)
	}
	disks, degraded := s.Status()
	if !degraded || len(disks) != 2 || disks[1].State != Failed || !strings.Contains(disks[1].Reason, "outside the policy") {
		t.Fatalf("status %+v degraded=%v", disks, degraded)
	}
	name, data := object(t, 4096)
	written, err := s.Put(ns, name, data)
	if err != nil || strings.Join(written, ",") != "a" {
		t.Fatalf("put: %v on %v", err, written)
	}
	if got, err := s.Get(ns, name); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("get: %v", err)
	}
	if _, err := s.Scrub(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(refused)
	if err != nil || len(entries) != 0 {
		t.Fatalf("the refused disk's directory holds %v (%v)", entries, err)
	}
}

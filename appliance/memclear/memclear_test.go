package memclear

import (
	"os"
	"path/filepath"
	"testing"
)

func TestAvailable(t *testing.T) {
	tests := []struct {
		name    string
		content string
		want    int64
		wantErr bool
	}{
		{"typical", "MemTotal:        1000000 kB\nMemFree:          500000 kB\nMemAvailable:     700000 kB\n", 700000 << 10, false},
		{"missing", "MemTotal: 1 kB\n", 0, true},
		{"not a number", "MemAvailable: lots kB\n", 0, true},
		{"negative", "MemAvailable: -5 kB\n", 0, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "meminfo")
			os.WriteFile(p, []byte(tc.content), 0o644)
			got, err := available(p)
			if (err != nil) != tc.wantErr || got != tc.want {
				t.Fatalf("available = %d, %v; want %d, error %v", got, err, tc.want, tc.wantErr)
			}
		})
	}
}

// Free maps memory until only Reserve is left available; with a meminfo
// that says little is available it maps nothing, and a drop_caches it
// cannot write is an error (nothing is mapped then either).
func TestFreeStopsAtReserve(t *testing.T) {
	dir := t.TempDir()
	meminfo := filepath.Join(dir, "meminfo")
	drop := filepath.Join(dir, "drop_caches")
	os.WriteFile(meminfo, []byte("MemAvailable: 1024 kB\n"), 0o644)
	os.WriteFile(drop, nil, 0o644)
	n, err := Free(meminfo, drop)
	if err != nil || n != 0 {
		t.Fatalf("Free with 1 MiB available = %d, %v; want 0, nil", n, err)
	}
	if b, _ := os.ReadFile(drop); string(b) != "3\n" {
		t.Fatalf("drop_caches got %q", b)
	}
	if _, err := Free(meminfo, filepath.Join(dir, "missing", "drop_caches")); err == nil {
		t.Fatal("Free without drop_caches succeeded")
	}
}

package keybroker

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// recordingSetter keeps what the watcher handed over.
type recordingSetter struct {
	mu    sync.Mutex
	calls []struct {
		fps map[string]bool
		err error
	}
}

func (r *recordingSetter) SetRevokedCustodians(fps map[string]bool, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, struct {
		fps map[string]bool
		err error
	}{fps, err})
}

func (r *recordingSetter) last() (int, map[string]bool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.calls) == 0 {
		return 0, nil, nil
	}
	c := r.calls[len(r.calls)-1]
	return len(r.calls), c.fps, c.err
}

// TestWatchRevokedCustodians: each change of the revocation file reaches
// the serving broker; a file that does not parse reaches it as an error
// (the broker then admits no custodian).
func TestWatchRevokedCustodians(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, RevokedCustodiansFile)
	fp := strings.Repeat("ab", 32)
	rec := &recordingSetter{}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go watchRevokedCustodians(ctx, dir, rec, slog.New(slog.NewTextHandler(io.Discard, nil)), 10*time.Millisecond)
	wait := func(calls int) (map[string]bool, error) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) {
			if n, fps, err := rec.last(); n >= calls {
				return fps, err
			}
			time.Sleep(5 * time.Millisecond)
		}
		t.Fatalf("the watcher did not report change %d", calls)
		return nil, nil
	}
	steps := []struct {
		name    string
		content string
		wantFP  bool
		wantErr bool
	}{
		{"revoked", fp + " revoked 2026-11-24T00:00:00Z\n", true, false},
		{"corrupt", "not-a-fingerprint\n", false, true},
		{"fixed", "# comment\n" + fp + "\n", true, false},
	}
	for i, st := range steps {
		time.Sleep(20 * time.Millisecond) // a new modification time
		if err := os.WriteFile(path, []byte(st.content), 0o600); err != nil {
			t.Fatal(err)
		}
		fps, err := wait(i + 1)
		if fps[fp] != st.wantFP || (err != nil) != st.wantErr {
			t.Fatalf("%s: got %v, %v", st.name, fps, err)
		}
	}
}

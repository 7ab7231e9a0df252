package qemutests

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/qemu-tests/vm"
)

// sharedTwins is one running twin pair (a copy of the provisioned embassy)
// that read-mostly scenarios use one after the other: they add data and
// check it, and change nothing they do not put back. It is started by the
// first of them and stopped by the next scenario that boots a VM or starts
// brokers of its own, or when the test binary ends. Scenarios using it
// tolerate what earlier ones stored (an existing repository, more
// snapshots).
var sharedTwins struct {
	mu   sync.Mutex
	hb   *hostBrokers
	a, b *twin
	dir  string
	n    int
}

// twinPair returns the shared running pair, starting it if needed.
func twinPair(t *testing.T, timeout time.Duration) (context.Context, *hostBrokers, *twin, *twin, *http.Client) {
	t.Helper()
	requireE2E(t)
	at := provisionedEmbassy(t) // before the lock: making it boots VMs
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	sharedTwins.mu.Lock()
	defer sharedTwins.mu.Unlock()
	if sharedTwins.a == nil {
		start := time.Now()
		sharedTwins.n++
		dir := filepath.Join(fixture.root, fmt.Sprintf("shared-twins-%d", sharedTwins.n))
		hb := newHostBrokers(t, at.copyTo(t, dir))
		logDir := filepath.Join(repoRoot, "out", "test-logs", "shared-twins")
		os.RemoveAll(logDir)
		var tws []*twin
		for _, name := range twinNames {
			tw := restTwin(t, hb, dir, name)
			tw.cfg.LogDir = logDir
			sctx, scancel := context.WithTimeout(context.Background(), time.Minute)
			harnessNetwork(t, &tw.cfg)
			v, err := vm.Start(sctx, tw.cfg)
			scancel()
			if err != nil {
				for _, o := range tws {
					o.v.Close()
				}
				hb.close()
				t.Fatalf("start shared %s: %v", name, err)
			}
			tw.v = v
			tws = append(tws, tw)
		}
		sharedTwins.hb, sharedTwins.a, sharedTwins.b, sharedTwins.dir = hb, tws[0], tws[1], dir
		for _, tw := range tws {
			waitMsg(t, ctx, tw.v, 0, logmsg.MsgServing)
		}
		for i, tw := range tws {
			waitPeer(t, ctx, tw, tws[1-i].id)
		}
		t.Logf("shared twin pair serving in %.1fs (console logs in %s)", time.Since(start).Seconds(), logDir)
	}
	return ctx, sharedTwins.hb, sharedTwins.a, sharedTwins.b, ingestHTTP(t, "home-state-auditor")
}

// releaseSharedTwins stops the shared pair, if one runs.
func releaseSharedTwins() {
	sharedTwins.mu.Lock()
	defer sharedTwins.mu.Unlock()
	if sharedTwins.a == nil {
		return
	}
	sharedTwins.a.v.Close()
	sharedTwins.b.v.Close()
	sharedTwins.hb.close()
	os.RemoveAll(sharedTwins.dir)
	sharedTwins.hb, sharedTwins.a, sharedTwins.b, sharedTwins.dir = nil, nil, nil, ""
}

// initRepo creates the repository unless an earlier scenario on the shared
// pair did.
func initRepo(t *testing.T, rc *resticClient) {
	t.Helper()
	if _, err := rc.run(t, "cat", "config"); err == nil {
		t.Logf("repository exists already (shared pair)")
		return
	}
	mustRestic(t, rc, "init")
}

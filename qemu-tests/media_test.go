package qemutests

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash/fnv"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/store"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
)

const blockSize = 4096

// imageBlocks hashes every 4 KiB block of a raw disk image.
func imageBlocks(t testing.TB, path string) []uint64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []uint64
	buf := make([]byte, blockSize)
	for {
		if _, err := io.ReadFull(f, buf); err != nil {
			return out
		}
		h := fnv.New64a()
		h.Write(buf)
		out = append(out, h.Sum64())
	}
}

// longestChange returns the byte offset of the middle of the longest run
// of blocks that differ, and the run's length in bytes. The disks are
// encrypted, so the host cannot read where an object went; a new 4 MiB
// object is the only long run of changed blocks a single write leaves.
func longestChange(before, after []uint64) (int64, int64) {
	bestStart, bestLen, start := 0, 0, -1
	for i := 0; i <= len(after); i++ {
		changed := i < len(after) && (i >= len(before) || before[i] != after[i])
		switch {
		case changed && start < 0:
			start = i
		case !changed && start >= 0:
			if i-start > bestLen {
				bestStart, bestLen = start, i-start
			}
			start = -1
		}
	}
	return int64(bestStart+bestLen/2) * blockSize, int64(bestLen) * blockSize
}

// placeObject stores a fresh 4 MiB object through A's ingest API and finds
// where it landed on each of A's disks.
func placeObject(t testing.TB, hw *http.Client, a *twin) (string, [2]int64) {
	t.Helper()
	before := [2][]uint64{imageBlocks(t, a.cfg.Disks[0]), imageBlocks(t, a.cfg.Disks[1])}
	data := make([]byte, 4<<20)
	rand.Read(data)
	sum := sha256.Sum256(data)
	name := hex.EncodeToString(sum[:])
	resp, err := hw.Post(fmt.Sprintf("https://127.0.0.1:%d/population/data/%s", a.ports[0], name), "application/octet-stream", bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("store object: %s", resp.Status)
	}
	var offs [2]int64
	for i := range offs {
		off, n := longestChange(before[i], imageBlocks(t, a.cfg.Disks[i]))
		if n < 1<<20 {
			t.Fatalf("disk %d: no long run of changed blocks after the write (longest %d bytes)", i, n)
		}
		offs[i] = off
	}
	return name, offs
}

// TestMediaErrorsHealed: A's disks go behind blkdebug with read errors
// where objects live. A read finds the bad copy, is served from the other
// disk and rewrites the copy (to new blocks); a scrub does the same for a
// copy nothing read; the health report counts the errors per disk. With
// both copies unreadable, the object is fetched from B and rewritten.
func TestMediaErrorsHealed(t *testing.T) {
	parallelScenario(t, 2, 120*time.Second)
	ctx, _, a, b, hc := twinDrill(t, 15*time.Minute)
	hw := ingestHTTP(t, "population-registry")

	readPath, offRead := placeObject(t, hw, a)   // bad on disk 0, found by a read
	scrubPath, offScrub := placeObject(t, hw, a) // bad on disk 1, found by the scrub
	both, offBoth := placeObject(t, hw, a)       // bad on both disks
	waitConverged(t, ctx, hc, a, b)
	t.Logf("object offsets: read %v, scrub %v, both %v", offRead, offScrub, offBoth)

	// Round 1: one bad copy each.
	a.v.Close()
	disk0Before := imageBlocks(t, a.cfg.Disks[0])
	a.cfg.ReadErrors = map[int][]int64{0: {offRead[0]}, 1: {offScrub[1]}}
	a.restart(t)
	waitMsg(t, ctx, a.v, 0, "ingest serving")
	if err := verifyObject(hc, a.ports[0], "population/data/"+readPath); err != nil {
		t.Fatalf("read with a bad sector on disk 0: %v", err)
	}
	i, rerr := waitMsg(t, ctx, a.v, 0, "read error")
	if !strings.Contains(fmt.Sprint(rerr["err"]), "input/output error") {
		t.Fatalf("read error is not a media error: %v", rerr)
	}
	// The read healed its own object's copy, before any scrub began.
	healedAt, healed := waitMsg(t, ctx, a.v, i, store.MsgHealedCopy)
	if healed["name"] != readPath {
		t.Fatalf("the first healed copy is %v, not the object that was read", healed)
	}
	for _, l := range a.v.Lines()[:healedAt] {
		if bootreport.JSONMsg(l.Text) == store.MsgScrubStarted {
			t.Fatalf("a scrub started before the read healed its copy: the heal is not the read's")
		}
	}
	_, scrub := waitMsg(t, ctx, a.v, 0, "scrub finished")
	if scrub["healed"].(float64) < 1 || scrub["unrecoverable"].(float64) != 0 {
		t.Fatalf("scrub: %v", scrub)
	}
	// The healed copy went to new blocks: disk 0 has a new run of a whole
	// object elsewhere, and the bad sector is not part of it.
	off, n := longestChange(disk0Before, imageBlocks(t, a.cfg.Disks[0]))
	if n < 1<<20 {
		t.Fatalf("disk 0: no new run of blocks after the heal (longest %d bytes)", n)
	}
	if offRead[0] >= off-n/2 && offRead[0] < off+n/2 {
		t.Fatalf("disk 0: the healed copy was written over the bad sector at %d (run %d±%d)", offRead[0], off, n/2)
	}
	t.Logf("disk 0: healed copy at %d (%d bytes), bad sector at %d", off, n, offRead[0])
	h := waitHealth(t, ctx, func() (*api.Health, error) { return health(hc, a.ports[0]) }, "read errors counted per disk",
		func(h *api.Health) bool {
			d0, d1 := diskBySerial(h, "EMBASSY0000"), diskBySerial(h, "EMBASSY0001")
			return d0 != nil && d1 != nil && d0.ReadErrors >= 1 && d1.ReadErrors >= 1 && d0.Healed >= 1 && d1.Healed >= 1 && !h.Degraded
		})
	t.Logf("health after round 1: %+v", h.Disks)

	// Round 2: both copies unreadable; B has the object.
	a.v.Close()
	a.cfg.ReadErrors = map[int][]int64{0: {offRead[0], offBoth[0]}, 1: {offScrub[1], offBoth[1]}}
	a.restart(t)
	waitMsg(t, ctx, a.v, 0, "ingest serving")
	for _, n := range []string{both, readPath, scrubPath} {
		if err := verifyObject(hc, a.ports[0], "population/data/"+n); err != nil {
			t.Fatalf("round 2: %v", err)
		}
	}
	_, fromPeer := waitMsg(t, ctx, a.v, 0, store.MsgHealedFromPeer)
	if fromPeer["name"] != both {
		t.Fatalf("healed from peer: %v", fromPeer)
	}
	_, scrub = waitMsg(t, ctx, a.v, 0, "scrub finished")
	if scrub["unrecoverable"].(float64) != 0 {
		t.Fatalf("scrub after peer heal: %v", scrub)
	}
	for _, l := range a.v.Lines() {
		if bootreport.JSONMsg(l.Text) == "object has no good copy" {
			t.Fatalf("unrecoverable object: %s", l.Text)
		}
	}
}

package qemutests

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/disks/discover"
	"github.com/dataembassy/embassy/disks/luks2"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
)

// TestNullCipherDiskRefused: someone with the disk in hand rewrites both
// LUKS2 headers of one mirror to a null cipher and recomputes their
// (unkeyed) checksums. The appliance must not unlock that disk with the
// real passphrase and fill it with plaintext: it refuses the disk as
// foreign (console and health, by serial), serves degraded from the other
// mirror, and writes nothing to the refused disk, which the host checks
// byte for byte.
func TestNullCipherDiskRefused(t *testing.T) {
	parallelScenario(t, 1, 30*time.Second)
	_, cfg, _ := provisioned(t, "nullcipher")
	forged := cfg.Disks[1]
	d, err := discover.Classify(forged)
	if err != nil || d.Kind != discover.Ours {
		t.Fatalf("the copied disk is not ours before the forgery: %+v %v", d, err)
	}
	f, err := os.OpenFile(forged, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	err = luks2.ForgeHeaders(f, int64(d.PartitionOffset), func(m map[string]any) {
		m["segments"].(map[string]any)["0"].(map[string]any)["encryption"] = "cipher_null-ecb"
	})
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	before := fileDigest(t, forged)

	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	v := startVM(t, cfg)
	// The disks are classified, unlocked or refused before the store opens.
	_, st := waitMsg(t, ctx, v, 0, logmsg.MsgStoreOpen)
	if st["degraded"] != true {
		t.Fatalf("store with a refused mirror: %v, want degraded", st)
	}
	var refused map[string]any
	for _, l := range v.Lines() {
		if bootreport.JSONMsg(l.Text) == logmsg.MsgDiskRefused {
			json.Unmarshal([]byte(l.Text), &refused)
		}
	}
	if refused["serial"] != "EMBASSY0001" || refused["uuid"] != d.LUKSUUID || !strings.Contains(fmt.Sprint(refused["reason"]), "cipher_null") {
		t.Fatalf("refusal reported as %v, want disk EMBASSY0001 (%s) and the cipher", refused, d.LUKSUUID)
	}
	waitMsg(t, ctx, v, 0, logmsg.MsgServing)
	for _, l := range v.Lines() {
		if strings.Contains(l.Text, "volume unlocked and mounted") && strings.Contains(l.Text, d.LUKSUUID) {
			t.Fatalf("the forged disk was unlocked: %s", l.Text)
		}
	}

	// Serving from the other mirror: a backup and a full read.
	rc := newResticClient(t, cfg.Forwards[0].HostPort, "population-registry")
	mustRestic(t, rc, "init")
	mustRestic(t, rc, "backup", randomTree(t, 4, 1<<20))
	mustRestic(t, rc, "check", "--read-data")
	hc := ingestHTTP(t, "home-state-auditor")
	h := waitHealth(t, ctx, func() (*api.Health, error) { return health(hc, cfg.Forwards[0].HostPort) }, "health shows the refused disk",
		func(h *api.Health) bool {
			d := diskBySerial(h, "EMBASSY0001")
			return h.Degraded && d != nil && d.State == "failed" && strings.Contains(d.Reason, "cipher_null")
		})
	t.Logf("health: %+v", h.Disks)
	v.Close()
	if after := fileDigest(t, forged); after != before {
		t.Fatal("the refused disk was written to")
	}
}

// fileDigest is the SHA-256 of a whole file.
func fileDigest(t testing.TB, path string) [sha256.Size]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	var sum [sha256.Size]byte
	copy(sum[:], h.Sum(nil))
	return sum
}

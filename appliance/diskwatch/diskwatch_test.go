package diskwatch

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/appliance/store"
	"github.com/dataembassy/embassy/appliance/volumes"
	"github.com/dataembassy/embassy/disks/discover"
)

// fakeVolumes stands in for the volume manager: closing forgets a volume,
// as volumes.Manager does even when closing fails.
type fakeVolumes struct {
	mu     sync.Mutex
	open   []volumes.Volume
	closed []string
}

func (f *fakeVolumes) Volumes() []volumes.Volume {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]volumes.Volume(nil), f.open...)
}

func (f *fakeVolumes) Close(uuid string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = append(f.closed, uuid)
	for i, v := range f.open {
		if v.UUID == uuid {
			f.open = append(f.open[:i], f.open[i+1:]...)
			return nil
		}
	}
	return fmt.Errorf("no open volume %s", uuid)
}

func (f *fakeVolumes) ReleaseStale() error { return nil }

// env is a fake machine: a sysfs tree (block/<name>) and a /dev with disk
// images, a real store over two volumes (vda and vdb), and the watcher's
// actions recorded.
type env struct {
	t          *testing.T
	root       string
	logs       bytes.Buffer
	st         *store.Store
	vols       *fakeVolumes
	w          *Watcher
	probes     int
	provisions []string
}

func newEnv(t *testing.T, approvals int) *env {
	e := &env{t: t, root: t.TempDir()}
	for _, dir := range []string{"sys/block", "dev"} {
		if err := os.MkdirAll(filepath.Join(e.root, dir), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	log := slog.New(slog.NewJSONHandler(&e.logs, nil))
	e.vols = &fakeVolumes{}
	var specs []store.DiskSpec
	for i, name := range []string{"vda", "vdb"} {
		e.plug(name, false)
		v := volumes.Volume{Disk: name, UUID: fmt.Sprintf("uuid-%d", i), Serial: fmt.Sprintf("SERIAL-%d", i),
			MountPoint: filepath.Join(e.root, "mnt", name)}
		e.vols.open = append(e.vols.open, v)
		specs = append(specs, store.DiskSpec{ID: v.UUID, Root: filepath.Join(v.MountPoint, "store")})
	}
	st, err := store.Open(log, specs)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Put("repo/config", "config", []byte("restic config")); err != nil {
		t.Fatal(err)
	}
	e.st = st
	e.w = New(Config{
		Log:      log,
		SysBlock: filepath.Join(e.root, "sys/block"),
		DevDir:   filepath.Join(e.root, "dev"),
		List: func(sysBlock, devDir string) ([]discover.Disk, error) {
			e.probes++
			return discover.List(sysBlock, devDir)
		},
		ApplianceID: "appliance-under-test",
		Store:       st,
		Volumes:     e.vols,
		Provision: func(ctx context.Context, d discover.Disk) (volumes.Volume, int, bool) {
			e.provisions = append(e.provisions, d.Name)
			v := volumes.Volume{Disk: d.Name, UUID: "uuid-new", Serial: "SERIAL-NEW", MountPoint: filepath.Join(e.root, "mnt", d.Name)}
			e.vols.open = append(e.vols.open, v)
			return v, 0, true
		},
		Approvals: approvals,
	})
	return e
}

// plug adds a block device to the sysfs tree with a node in /dev: a
// zeroed image (blank) or one with data at both ends (foreign).
func (e *env) plug(name string, blank bool) {
	e.t.Helper()
	if err := os.MkdirAll(filepath.Join(e.root, "sys/block", name, "queue"), 0o755); err != nil {
		e.t.Fatal(err)
	}
	const size = 4 << 20
	img := make([]byte, size)
	if !blank {
		copy(img, "not a known signature")
		copy(img[size-64:], "data at the end")
	}
	if err := os.WriteFile(filepath.Join(e.root, "dev", name), img, 0o600); err != nil {
		e.t.Fatal(err)
	}
}

// pull removes a block device, as the kernel does when a disk is pulled.
func (e *env) pull(name string) {
	e.t.Helper()
	if err := os.RemoveAll(filepath.Join(e.root, "sys/block", name)); err != nil {
		e.t.Fatal(err)
	}
	os.Remove(filepath.Join(e.root, "dev", name))
}

// logged returns the log lines with message msg.
func (e *env) logged(msg string) []map[string]any {
	var out []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(e.logs.String()), "\n") {
		var f map[string]any
		if json.Unmarshal([]byte(line), &f) == nil && f["msg"] == msg {
			out = append(out, f)
		}
	}
	return out
}

func (e *env) state(id string) store.DiskState {
	disks, _ := e.st.Status()
	for _, d := range disks {
		if d.ID == id {
			return d.State
		}
	}
	return ""
}

func TestWatcher(t *testing.T) {
	cases := []struct {
		name      string
		approvals int
		steps     func(e *env)
		check     func(t *testing.T, e *env)
	}{
		{
			name: "no probing while the set of devices is unchanged",
			steps: func(e *env) {
				for range 3 {
					e.w.Check(context.Background())
				}
			},
			check: func(t *testing.T, e *env) {
				if e.probes != 1 {
					t.Fatalf("%d probes, want 1", e.probes)
				}
				if len(e.logged(logmsg.MsgDiskFailed)) != 0 || len(e.provisions) != 0 {
					t.Fatalf("disks failed or provisioned: %s", e.logs.String())
				}
			},
		},
		{
			name: "a new device is probed once",
			steps: func(e *env) {
				e.w.Check(context.Background())
				e.plug("vdc", false)
				for range 3 {
					e.w.Check(context.Background())
				}
			},
			check: func(t *testing.T, e *env) {
				if e.probes != 2 {
					t.Fatalf("%d probes, want 2", e.probes)
				}
			},
		},
		{
			name: "a vanished disk is failed once",
			steps: func(e *env) {
				e.w.Check(context.Background())
				e.pull("vdb")
				for range 3 {
					e.w.Check(context.Background())
				}
			},
			check: func(t *testing.T, e *env) {
				if s := e.state("uuid-1"); s != store.Failed {
					t.Fatalf("pulled disk is %q", s)
				}
				if s := e.state("uuid-0"); s != store.Healthy {
					t.Fatalf("remaining disk is %q", s)
				}
				failed := e.logged(logmsg.MsgDiskFailed)
				if len(failed) != 1 || failed[0]["serial"] != "SERIAL-1" || failed[0]["device"] != "vdb" ||
					failed[0]["reason"] != "disk removed" || failed[0]["action"] != "volume closed; replace the disk" {
					t.Fatalf("disk failed logged as %v", failed)
				}
				if fmt.Sprint(e.vols.closed) != "[uuid-1]" {
					t.Fatalf("volumes closed: %v", e.vols.closed)
				}
				h := e.w.Health()
				if !h.Degraded || len(h.Disks) != 2 || h.Disks[1].Serial != "SERIAL-1" || h.Disks[1].State != "failed" {
					t.Fatalf("health %+v", h)
				}
			},
		},
		{
			name: "a blank disk is reported and waits for approval",
			steps: func(e *env) {
				e.plug("vdc", true)
				for range 2 {
					e.w.Check(context.Background())
				}
			},
			check: func(t *testing.T, e *env) {
				blank := e.logged(logmsg.MsgBlankDisk)
				if len(blank) != 1 || blank[0]["device"] != "vdc" || blank[0]["appliance_id"] != "appliance-under-test" {
					t.Fatalf("blank disk logged as %v", blank)
				}
				h := e.w.Health()
				if len(h.BlankDisks) != 1 || h.BlankDisks[0].Device != "vdc" || h.BlankDisks[0].State != "blank, waiting for approval" {
					t.Fatalf("blank disks in health: %+v", h.BlankDisks)
				}
				if len(e.provisions) != 0 {
					t.Fatalf("provisioned without approval: %v", e.provisions)
				}
			},
		},
		{
			name:      "an approved blank disk replaces a failed one",
			approvals: 1,
			steps: func(e *env) {
				e.w.Check(context.Background())
				e.pull("vdb")
				e.plug("vdc", true)
				for range 3 {
					e.w.Check(context.Background())
				}
			},
			check: func(t *testing.T, e *env) {
				// One approval: one provisioning, although the fake disk
				// stays blank.
				if fmt.Sprint(e.provisions) != "[vdc]" {
					t.Fatalf("provisioned %v", e.provisions)
				}
				if s := e.state("uuid-new"); s != store.Healthy {
					t.Fatalf("new disk is %q", s)
				}
				if s := e.state("uuid-1"); s != "" {
					t.Fatalf("failed disk not retired: %q", s)
				}
				healthy := e.logged(logmsg.MsgDiskHealthy)
				if len(healthy) != 1 || healthy[0]["serial"] != "SERIAL-NEW" || healthy[0]["degraded"] != false || healthy[0]["objects"] != 1.0 {
					t.Fatalf("resync logged as %v", healthy)
				}
				if _, err := os.Stat(filepath.Join(e.root, "mnt", "vdc", "store")); err != nil {
					t.Fatalf("new disk holds no store: %v", err)
				}
				// Probed at first, after the devices changed, and again after
				// the provisioning attempt.
				if e.probes != 3 {
					t.Fatalf("%d probes, want 3", e.probes)
				}
			},
		},
		{
			name:      "approvals recorded by a later attestation are used",
			approvals: 0,
			steps: func(e *env) {
				e.plug("vdc", true)
				e.w.Check(context.Background())
				e.w.SetApprovals(1)
				e.w.Check(context.Background())
			},
			check: func(t *testing.T, e *env) {
				if fmt.Sprint(e.provisions) != "[vdc]" {
					t.Fatalf("provisioned %v", e.provisions)
				}
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, tc.approvals)
			tc.steps(e)
			tc.check(t, e)
		})
	}
}

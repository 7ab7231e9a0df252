package qemutests

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/operator/opclient"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
	"github.com/dataembassy/embassy/qemu-tests/vm"
)

// TestServerReplacement: twins A and B serve with data; A dies (its VM
// killed, its disks kept). A new server C, enrolled at home, is racked in
// A's place (A's host ports) with two blank disks, and the operators run
// `replace A C`: every broker approves C's disks and gives it A's
// endpoints; C provisions its disks, takes B as its peer and pulls
// everything from it; once B has nothing pending for C, A is revoked and
// its shares destroyed at every broker. restic's client, at A's address,
// now reaches C: the same snapshots, and check --read-data passes. Then
// A's disks go back into A's chassis (its TPM and firmware): every broker
// refuses A (revoked); and into C's chassis: C attests, but every broker
// audits both disks as locked, their shares destroyed with A; neither
// boot unlocks anything, and A's disk images are unchanged byte for byte.
// Each step is audited at every broker with that broker's custodian.
func TestServerReplacement(t *testing.T) {
	parallelScenario(t, 2, 145*time.Second) // A and B, then B and C (A's old chassis beside C for a while)
	hb, dir := copyEmbassy(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	a, b := startTwins(t, ctx, hb, dir)
	hc := ingestHTTP(t, "home-state-auditor")
	ra := newResticClient(t, a.ports[0], "population-registry")
	mustRestic(t, ra, "init")
	mustRestic(t, ra, "backup", randomTree(t, 4, 1<<20))
	objects := waitConverged(t, ctx, hc, a, b)
	snapshots := mustRestic(t, ra, "snapshots", "--json")

	// A's reports at k brokers show nothing pending to B (it reports at
	// each re-attestation); replace checks that before it decommissions.
	for deadline := time.Now().Add(time.Minute); !opclient.LastUnreplicated(hb.ops.Status(ctx), a.id, 2, time.Now()).Clear; time.Sleep(2 * time.Second) {
		if time.Now().After(deadline) {
			t.Fatalf("the brokers never showed A with nothing pending: %+v", opclient.LastUnreplicated(hb.ops.Status(ctx), a.id, 2, time.Now()))
		}
	}

	// A dies. Its disks stay where they are.
	a.v.Kill()
	a.v.Close()
	diskDigests := map[string][sha256.Size]byte{}
	for _, d := range a.cfg.Disks {
		diskDigests[d] = fileDigest(t, d)
	}

	// C: a new server with blank disks, racked where A was (its ports),
	// enrolled by the operators at home.
	c := &twin{name: "twin-c", ports: a.ports}
	c.cfg = bootreport.BootConfig(c.name, imageDir())
	c.cfg.LogDir, c.cfg.SwtpmCA = testLogDir(t), filepath.Join(cacheDir(), "swtpm-localca")
	c.cfg.StateDir = t.TempDir()
	c.cfg.Disks = []string{rawDisk(t, fixtureDiskSize), rawDisk(t, fixtureDiskSize)}
	c.cfg.Forwards = a.cfg.Forwards
	c.v = startVM(t, c.cfg)
	_, ident := waitMsg(t, ctx, c.v, 0, logmsg.MsgIdentity)
	c.id = ident["appliance_id"].(string)
	waitMsg(t, ctx, c.v, 0, logmsg.MsgEnrollRequested)
	for _, br := range hb.b {
		if err := br.ApproveEnrollment(hb.op(br), c.id); err != nil {
			t.Fatal(err)
		}
	}

	began := time.Now()
	rep, err := hb.ops.Replace(ctx, a.id, c.id, opclient.ReplaceOptions{
		Threshold: 2, CatchUp: 8 * time.Minute, Poll: 3 * time.Second,
		// Longer than the twins' anti-entropy interval (30 s).
		Settle: 35 * time.Second, Progress: testWriter{t}})
	if err != nil {
		t.Fatalf("replace: %v (%+v)", err, rep)
	}
	t.Logf("replace %s by %s: caught up and decommissioned in %.1fs", a.name, c.name, time.Since(began).Seconds())
	if rep.Disks != 2 || !slices.Equal(rep.Endpoints, a.endpoints()) || !rep.CaughtUp || rep.Decommission == nil {
		t.Fatalf("replace report: %+v", rep)
	}
	var aDisks []string
	for _, d := range rep.Decommission.Disks {
		aDisks = append(aDisks, d.ID)
		if !d.Unreadable || len(d.Holders) != 0 {
			t.Errorf("A's disk %+v is not unreadable", d)
		}
	}
	if len(aDisks) != 2 {
		t.Fatalf("the decommission names disks %v, A had 2", aDisks)
	}

	// restic's client, unchanged, reaches C at A's address: everything is
	// there and verifies.
	if got := mustRestic(t, ra, "snapshots", "--json"); got != snapshots {
		t.Fatalf("snapshots through C differ:\n%s\nwant\n%s", got, snapshots)
	}
	mustRestic(t, ra, "check", "--read-data")
	if oc, err := repoObjects(hc, c.ports[0]); err != nil || len(oc) != objects {
		t.Fatalf("C holds %d objects (%v), A had %d", len(oc), err, objects)
	}

	// Every broker audited the replacement with its own custodian: C's
	// disks approved and A's endpoints given to C, A revoked and its
	// shares destroyed.
	for _, br := range hb.b {
		want := hb.op(br)
		entries, _, err := br.Audit()
		if err != nil {
			t.Fatal(err)
		}
		seen := map[string]bool{}
		for _, e := range entries {
			if e.Time.Before(began) || e.Result != "ok" || e.Actor == nil || e.Actor.Fingerprint != want.Fingerprint {
				continue
			}
			seen[e.Event+" "+e.Appliance] = true
		}
		for _, ev := range []string{"approve-disk " + c.id, "set-endpoints " + c.id, "revoke " + a.id, "destroy-shares " + a.id} {
			if !seen[ev] {
				t.Errorf("%s did not audit %q by %s", br.Name(), ev, want.Subject)
			}
		}
	}
	c.v.Close()

	// A's disks back in A's chassis, and (copies of them) in C's, booted
	// side by side.
	since := time.Now()
	oldCfg := a.cfg
	oldCfg.Name = "twin-a-after-replace"
	inC := c.cfg
	inC.Name = "twin-c-with-a-disks"
	inC.Disks = nil
	for i, d := range a.cfg.Disks {
		cp := filepath.Join(t.TempDir(), fmt.Sprintf("a-disk%d.img", i))
		if out, err := exec.Command("cp", "--sparse=always", d, cp).CombinedOutput(); err != nil {
			t.Fatalf("copy A's disk: %v\n%s", err, out)
		}
		inC.Disks = append(inC.Disks, cp)
	}
	inC.Forwards = nil
	probe := &twin{name: inC.Name, cfg: inC}
	probe.pickPorts(t)
	inC = probe.cfg
	vA := startVM(t, oldCfg)
	vC := startVM(t, inC)
	requireNoKeys(t, hb, vA, oldCfg, a.id, broker.ReasonRevoked)

	// In C's chassis: C attests, every broker audits both of A's disks as
	// locked (shares destroyed with A), nothing is unlocked or served.
	i, _ := waitMsg(t, ctx, vC, 0, logmsg.MsgAttested)
	waitMsg(t, ctx, vC, i, "no data volume is open; nothing is served")
	for _, br := range hb.b {
		why := ""
		entries, _, err := br.Audit()
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			if e.Appliance == c.id && !e.Time.Before(since) && e.Event == "attest" && e.Result == "ok" {
				why = e.Detail["locked_disks"]
			}
			if e.Event == "release" && !e.Time.Before(since) {
				for _, d := range aDisks {
					if e.Appliance == a.id || slices.Contains(strings.Split(e.Detail["disks"], ","), d) {
						t.Errorf("%s released after the replacement: %+v", br.Name(), e)
					}
				}
			}
		}
		for _, d := range aDisks {
			if !strings.Contains(why, d+": "+broker.DiskSharesDestroyed+" "+a.id) {
				t.Errorf("%s: C's attestation with A's disk %s audits locked disks %q", br.Name(), d, why)
			}
		}
	}
	for _, v := range []*vm.VM{vA, vC} {
		for _, l := range v.Lines() {
			if m := bootreport.JSONMsg(l.Text); m == "volume unlocked and mounted" || m == logmsg.MsgServing {
				t.Fatalf("a boot with A's disks got past the lock: %s", l.Text)
			}
		}
	}
	vA.Close()
	for d, was := range diskDigests {
		if fileDigest(t, d) != was {
			t.Errorf("A's disk %s changed", d)
		}
	}

	// From outside the brokers: no database holds a share of A's any
	// more (whoever edits a record back finds nothing to release); C's
	// are there.
	hb.close()
	for i := range hb.b {
		path := filepath.Join(dir, "brokers", fmt.Sprint(i), "broker.db")
		if got := sharesIn(t, path, a.id); len(got) != 0 {
			t.Errorf("%s still holds shares of A: %v", brokerNames[i], got)
		}
		if got := sharesIn(t, path, c.id); len(got) != 2 {
			t.Errorf("%s holds %d shares of C, want 2", brokerNames[i], len(got))
		}
	}
}

// sharesIn lists the share records of appliance id in a broker database
// at rest (its keys, <id>/<disk>).
func sharesIn(t testing.TB, path, id string) []string {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var keys []string
	err = db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("shares"))
		if b == nil {
			return fmt.Errorf("%s: no shares bucket", path)
		}
		c := b.Cursor()
		prefix := []byte(id + "/")
		for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
			keys = append(keys, string(k))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return keys
}

package qemutests

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/images/build"
	"github.com/dataembassy/embassy/images/manifest"
	"github.com/dataembassy/embassy/operator/opclient"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
)

// TestCustodiansApproveSeparately is the demo flow with three custodians,
// each holding a credential for their own broker only (alice@broker-a,
// bob@broker-b, carol@broker-c), seen from the side of one of them: a
// provisioned appliance boots a genuine new image v2 (same sources and
// keys; its image.json, so PCR9, differs from v1's).
//
// Alice approves v2 with her credential at every broker, as embassyctl
// would: broker-a takes it, broker-b and broker-c refuse her (401
// unauthenticated) and change nothing. Booting v2, the appliance gets at
// most broker-a's share, below k=2: counted in every broker's own audit
// log since the boot began, broker-a released, broker-b and broker-c
// refused it as an unapproved image and released nothing; the appliance
// logs "below threshold", unlocks nothing and serves nothing. Then bob
// approves v2 at broker-b with his credential: the appliance comes up
// serving by itself, broker-b releases only after bob's approval, broker-c
// (whose custodian never approved) still releases nothing, and the
// approvals in broker-a's and broker-b's audit logs name alice and bob.
//
// The control, from the attacker's side: with broker-b admitting alice's
// credential too (broker-a's custodian CA added to broker-b's
// Config.Custodians in newHostBrokers), this test fails at her approval at
// broker-b ("alice at broker-b: OK:true"), and with that check turned into
// a log line, at broker-b's release count: it released for the v2 boot on
// alice's word alone and the appliance attested with two brokers' shares.
func TestCustodiansApproveSeparately(t *testing.T) {
	parallelScenario(t, 1, 30*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	v1 := loadImage(t, imageDir())
	v2Dir := buildImageVersion(t, v1, 2)
	mb, err := os.ReadFile(filepath.Join(v2Dir, build.ManifestFile))
	if err != nil {
		t.Fatal(err)
	}
	sb, err := os.ReadFile(filepath.Join(v2Dir, build.SignatureFile))
	if err != nil {
		t.Fatal(err)
	}
	hb, cfg, id := provisioned(t, "custodians-v2")
	cfg.BootDisk = filepath.Join(v2Dir, manifest.ComponentDisk)
	alice, bob := hb.custodians[0], hb.custodians[1]
	aliceActor, bobActor := hb.op(hb.b[0]), hb.op(hb.b[1])
	start := time.Now()

	// Alice shows her broker-a credential to every broker.
	outs, err := custodianAt(t, hb, alice, 0, 1, 2).ApproveImage(ctx, mb, sb)
	if !errors.Is(err, opclient.ErrCredentialRefused) {
		t.Fatalf("alice's approval at every broker: %v, want %v", err, opclient.ErrCredentialRefused)
	}
	for i, want := range []struct {
		broker   string
		admitted bool
	}{{"broker-a", true}, {"broker-b", false}, {"broker-c", false}} {
		o := outs[i]
		if o.Broker != want.broker || o.OK != want.admitted || (!want.admitted && o.Code != api.CodeUnauthenticated) {
			t.Fatalf("alice at %s: %+v, want admitted %v (else refused with code %q)", want.broker, o, want.admitted, api.CodeUnauthenticated)
		}
		approvals := imageApprovals(t, hb.b[i], 2, start)
		wantN := 0
		if want.admitted {
			wantN = 1
		}
		if len(approvals) != wantN {
			t.Fatalf("%s audited %d approvals of v2 after alice's attempt, want %d: %+v", want.broker, len(approvals), wantN, approvals)
		}
		for _, e := range approvals {
			if *e.Actor != aliceActor {
				t.Fatalf("%s audited v2's approval as %v, want alice (%v)", want.broker, e.Actor, aliceActor)
			}
		}
	}
	for _, st := range hb.ops.Status(ctx) {
		if st.Error != "" {
			t.Fatalf("%s state: %s", st.Broker, st.Error)
		}
		approved := false
		for _, m := range st.State.Manifests {
			approved = approved || m.Version == 2
		}
		if approved != (st.Broker == "broker-a") {
			t.Fatalf("%s: v2 approved %v after alice's attempt", st.Broker, approved)
		}
	}

	// The appliance boots v2 with alice's approval alone: once it reports
	// (below threshold, or got further), count what every broker did.
	v := startVM(t, cfg)
	since := v.Started.Add(-time.Second)
	below, line, err := v.WaitFor(ctx, 0, func(s string) bool {
		switch bootreport.JSONMsg(s) {
		case "attestation below threshold; retrying":
			return strings.Contains(s, "1 of 3 brokers answered, 2 needed")
		case logmsg.MsgAttested, logmsg.MsgHalted:
			return true
		}
		return false
	})
	if err != nil {
		t.Fatalf("no below-threshold report on the console: %v", err)
	}
	got := countVerdicts(t, hb, id, since)
	for i, want := range []struct {
		releases bool // some release, each of v2
		refused  bool // some refusal as unapproved image, no attest ok
	}{{true, false}, {false, true}, {false, true}} {
		g := got[i]
		if (len(g.releases) > 0) != want.releases || (g.imageRefusals > 0) != want.refused || (want.refused && g.attested > 0) {
			t.Fatalf("%s since the v2 boot began: %s; want releases %v, refused as unapproved %v", brokerNames[i], g, want.releases, want.refused)
		}
		for _, ver := range g.releases {
			if ver != "2" {
				t.Fatalf("%s released for image version %s during the v2 boot", brokerNames[i], ver)
			}
		}
		t.Logf("%s, alice's approval only: %s", brokerNames[i], g)
	}
	if bootreport.JSONMsg(line.Text) != "attestation below threshold; retrying" {
		t.Fatalf("the appliance booting v2 with alice's approval alone: %s", line.Text)
	}
	if !strings.Contains(line.Text, broker.ReasonImage) {
		t.Errorf("the below-threshold report does not say why (%q): %s", broker.ReasonImage, line.Text)
	}
	t.Logf("below threshold %.0fs after the boot began", line.At.Sub(v.Started).Seconds())
	for _, l := range v.Lines() {
		switch bootreport.JSONMsg(l.Text) {
		case logmsg.MsgAttested, "volume unlocked and mounted", logmsg.MsgServing:
			t.Fatalf("the appliance got past attestation on alice's approval alone: %s", l.Text)
		}
	}
	noIngest(t, cfg)

	// Bob, custodian of broker-b, approves v2 there with his credential.
	bobApproved := time.Now()
	if _, err := custodianAt(t, hb, bob, 1).ApproveImage(ctx, mb, sb); err != nil {
		t.Fatalf("bob at broker-b: %v", err)
	}
	served, _ := waitMsg(t, ctx, v, below, logmsg.MsgServing)
	if at := v.Lines()[served].At; at.Before(bobApproved) {
		t.Fatalf("serving at %v, before bob approved at %v", at, bobApproved)
	}
	t.Logf("serving %.0fs after bob's approval", v.Lines()[served].At.Sub(bobApproved).Seconds())
	got = countVerdicts(t, hb, id, since)
	for i, want := range []struct {
		approver *audit.Actor // whose approval of v2 the broker audited; nil: none
		releases bool
	}{{&aliceActor, true}, {&bobActor, true}, {nil, false}} {
		g := got[i]
		approvals := imageApprovals(t, hb.b[i], 2, start)
		if want.approver == nil {
			if len(approvals) != 0 || len(g.releases) != 0 || g.attested != 0 {
				t.Fatalf("%s, whose custodian never approved v2: approvals %+v; %s", brokerNames[i], approvals, g)
			}
			continue
		}
		if len(approvals) != 1 || *approvals[0].Actor != *want.approver {
			t.Fatalf("%s audited the approvals of v2 %+v, want one by %v", brokerNames[i], approvals, want.approver)
		}
		if len(g.releases) == 0 || g.firstRelease.Before(approvals[0].Time) {
			t.Fatalf("%s: %s; want releases after %v's approval at %v", brokerNames[i], g, want.approver, approvals[0].Time)
		}
		t.Logf("%s: v2 approved by %s (sha256 %s); %s", brokerNames[i], approvals[0].Actor.Subject, approvals[0].Actor.Fingerprint, g)
	}
}

// buildImageVersion builds a genuine image of the given version into a
// temporary folder: the same sources, image config and keys as base (the
// image under test, mkimage's local defaults) and the same kernel package.
// It differs from base in its version, so in image.json in the initramfs,
// so in PCR9 (and the UKI's digests). extra are more mkimage flags (such
// as --config).
func buildImageVersion(t testing.TB, base *manifest.Manifest, version uint64, extra ...string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), fmt.Sprintf("image-v%d", version))
	start := time.Now()
	args := append([]string{"build", "--out", dir, "--version", strconv.FormatUint(version, 10),
		"--cache", cacheDir(), "--kernel-package", base.Kernel.Package}, extra...)
	cmd := exec.Command(mkimage, args...)
	cmd.Dir = repoRoot
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("mkimage build --version %d: %v\n%s", version, err, out)
	}
	m := loadImage(t, dir)
	if m.Version != version || m.Measurements.Initrd == base.Measurements.Initrd {
		t.Fatalf("image v%d: version %d, PCR9 initrd %s (v%d's %s)", version, m.Version,
			m.Measurements.Initrd, base.Version, base.Measurements.Initrd)
	}
	t.Logf("image v%d built in %.1fs", version, time.Since(start).Seconds())
	return dir
}

// custodianAt is an operator client that shows cert, one custodian's
// credential, to the brokers at (indexes into hb.b), each verified by its
// own root CA.
func custodianAt(t testing.TB, hb *hostBrokers, cert tls.Certificate, at ...int) *opclient.Client {
	t.Helper()
	var list []opclient.Broker
	var creds []opclient.Credential
	for _, i := range at {
		list = append(list, hb.ops.Brokers[i])
		creds = append(creds, opclient.Credential{Cert: cert, Roots: brokerRoot(t, i).Pool()})
	}
	c, err := opclient.NewPerBroker(list, creds)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// imageApprovals are broker b's audited approvals of image version since
// a time, from its own audit log.
func imageApprovals(t testing.TB, b *broker.Broker, version uint64, since time.Time) []audit.Entry {
	t.Helper()
	entries, _, err := b.Audit()
	if err != nil {
		t.Fatalf("%s audit: %v", b.Name(), err)
	}
	var out []audit.Entry
	for _, e := range entries {
		if e.Event == "approve-image" && e.Result == "ok" && !e.Time.Before(since) &&
			e.Detail["version"] == strconv.FormatUint(version, 10) && e.Actor != nil {
			out = append(out, e)
		}
	}
	return out
}

// verdicts is what one broker did for an appliance over a time, from its
// own audit log.
type verdicts struct {
	releases      []string // each release's image version
	firstRelease  time.Time
	attested      int // attestations that passed
	imageRefusals int // attestations refused as an unapproved image
	otherFailures int
}

func (v verdicts) String() string {
	return fmt.Sprintf("%d releases (image versions %v), %d attestations ok, %d refused as unapproved image, %d other failures",
		len(v.releases), v.releases, v.attested, v.imageRefusals, v.otherFailures)
}

// countVerdicts counts, at every broker, its attestations and releases for
// appliance id since a time.
func countVerdicts(t testing.TB, hb *hostBrokers, id string, since time.Time) []verdicts {
	t.Helper()
	out := make([]verdicts, len(hb.b))
	for i, b := range hb.b {
		entries, _, err := b.Audit()
		if err != nil {
			t.Fatalf("%s audit: %v", b.Name(), err)
		}
		for _, e := range entries {
			if e.Appliance != id || e.Time.Before(since) {
				continue
			}
			switch {
			case e.Event == "release":
				if len(out[i].releases) == 0 {
					out[i].firstRelease = e.Time
				}
				out[i].releases = append(out[i].releases, e.Detail["image_version"])
			case e.Event == "attest" && e.Result == "ok":
				out[i].attested++
			case e.Event == "attest" && e.Reason == broker.ReasonImage:
				out[i].imageRefusals++
			case e.Event == "attest":
				out[i].otherFailures++
			}
		}
	}
	return out
}

package broker_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/dataembassy/embassy/operator/opclient"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// TestOperatorClient drives every embassyctl operation through opclient
// against real brokers, and checks the human and JSON renderings.
func TestOperatorClient(t *testing.T) {
	e := newEnv(t, 2, 2)
	oc := e.operatorClient()
	ctx := context.Background()

	d := tpmtest.NewBootDigests("image-1")
	a := e.boot(1, d, attester.EKRSA)
	defer a.shutdown()
	if err := a.c.Enroll(ctx); err != nil {
		t.Fatal(err)
	}
	id := a.c.ID()
	if outs, err := oc.ApproveEnrollment(ctx, id); err != nil || len(outs) != 2 || !outs[0].OK {
		t.Fatalf("enroll: %v %+v", err, outs)
	}
	m, s := e.signManifest(1, d, e.imageKey)
	if _, err := oc.ApproveImage(ctx, m, s); err != nil {
		t.Fatal(err)
	}
	outs, err := oc.ApproveImage(ctx, m, append([]byte(nil), s[:10]...))
	if err == nil {
		t.Fatal("a damaged signature was approved")
	}
	var be *opclient.BrokerError
	if !errors.As(err, &be) || be.Code != api.CodeManifestSignature || outs[0].Code != api.CodeManifestSignature {
		t.Fatalf("damaged signature refused with %v, outcomes %+v", err, outs)
	}
	if _, err := oc.SetFloor(ctx, id, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := oc.ApproveDisks(ctx, id, 2); err != nil {
		t.Fatal(err)
	}
	if _, err := oc.SetEndpoints(ctx, id, []string{"10.0.2.2:9443", "10.0.3.2:9444"}); err != nil {
		t.Fatal(err)
	}
	if _, err := oc.SetEndpoints(ctx, id, []string{"example.org:1"}); err == nil {
		t.Fatal("an endpoint that is not IP:port was accepted")
	}
	a.c.ReportHealth(func() *api.Health {
		return &api.Health{Degraded: true,
			Disks:      []api.DiskHealth{{Serial: "SN-OK", State: "healthy"}, {Serial: "SN-DEAD", Device: "vdb", State: "failed", Reason: "disk removed"}},
			BlankDisks: []api.DiskHealth{{Serial: "SN-NEW", Device: "vdc"}},
			Peers:      []api.PeerHealth{{ID: strings.Repeat("b", 32), Path: "10.0.3.2:9444", PendingObjects: 3, PendingBytes: 12 << 20, OldestSeconds: 42}}}
	})
	if _, err := a.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 2); err != nil {
		t.Fatal(err)
	}
	// Errors name what was wrong.
	if _, err := oc.SetFloor(ctx, "not-an-id", 1); err == nil || !strings.Contains(err.Error(), "not-an-id") {
		t.Fatalf("bad id: %v", err)
	}
	if _, err := oc.Revoke(ctx, strings.Repeat("0", 32)); err == nil || !strings.Contains(err.Error(), "unknown appliance") {
		t.Fatalf("unknown appliance: %v", err)
	}

	st := oc.Status(ctx)
	var out bytes.Buffer
	opclient.PrintStatus(&out, st)
	for _, want := range []string{"broker-a: approved images [1]", id, "enrolled", "ago", "store DEGRADED", "10.0.2.2:9443, 10.0.3.2:9444",
		"disk serial SN-DEAD vdb: failed (disk removed)", "disk serial SN-NEW vdc: blank, waiting for approval",
		"via 10.0.3.2:9444: 3 objects / 12582912 bytes behind, oldest 42s"} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("status lacks %q:\n%s", want, out.String())
		}
	}
	if st[0].State.Appliances[0].DiskApprovals != 2 || st[0].State.Appliances[0].LastImage != 1 {
		t.Fatalf("state %+v", st[0].State.Appliances[0])
	}
	if _, err := oc.Revoke(ctx, id); err != nil {
		t.Fatal(err)
	}
	logs := oc.Audit(ctx)
	out.Reset()
	opclient.PrintAudit(&out, logs, true)
	for _, want := range []string{"chain verified", "enroll-request", "activate", "approve-image", "fail", "attest", "revoke",
		`by operator "CN=operator alice" (sha256 `, "by appliance " + id} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("audit output lacks %q:\n%s", want, out.String())
		}
	}
	out.Reset()
	if err := opclient.PrintJSON(&out, logs); err != nil || !strings.Contains(out.String(), `"verified": true`) {
		t.Fatalf("JSON audit: %v\n%s", err, out.String())
	}
}

package broker_test

import (
	"net/http"
	"testing"
	"time"

	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// TestPeersAndHealth: brokers hand every appliance the other enrolled
// appliances' endpoints, never its own, never a revoked one; an appliance's
// health report shows in the operator's state.
func TestPeersAndHealth(t *testing.T) {
	e := newEnv(t, 3, 2)
	d := tpmtest.NewBootDigests("image-1")
	first := e.boot(1, d, attester.EKRSA)
	e.enroll(first)
	e.approveImage(1, d)
	firstID := first.c.ID()
	first.shutdown()

	second := e.boot(2, d, attester.EKRSA)
	defer second.shutdown()
	e.enroll(second)
	for i := range e.brokers {
		if err := e.op(i, http.MethodPost, api.PathAppliances+firstID+"/endpoints", api.EndpointsRequest{Endpoints: []string{"bad endpoint"}}, nil); err == nil {
			t.Fatal("malformed endpoint accepted")
		}
	}
	e.opAll(http.MethodPost, api.PathAppliances+firstID+"/endpoints", api.EndpointsRequest{Endpoints: []string{"10.0.2.2:9443", "10.0.3.2:9444"}})
	e.opAll(http.MethodPost, api.PathAppliances+second.c.ID()+"/endpoints", api.EndpointsRequest{Endpoints: []string{"10.0.2.2:9445"}})

	second.c.ReportHealth(func() *api.Health {
		return &api.Health{Degraded: true, Disks: []api.DiskHealth{{Serial: "SN-1", State: "failed"}}}
	})
	results, err := second.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 3)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range results {
		if len(r.Peers) != 1 || r.Peers[0].ID != firstID || len(r.Peers[0].Endpoints) != 2 {
			t.Fatalf("%s: peers %+v", r.Broker, r.Peers)
		}
	}
	var st api.State
	if err := e.op(0, http.MethodGet, api.PathState, nil, &st); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, a := range st.Appliances {
		if a.ID == second.c.ID() {
			found = a.Health != nil && a.Health.Degraded && a.Health.Disks[0].Serial == "SN-1" && !a.Health.Reported.IsZero()
		}
	}
	if !found {
		t.Fatalf("health not in state: %+v", st.Appliances)
	}

	// A revoked appliance is nobody's peer.
	e.opAll(http.MethodPost, api.PathAppliances+firstID+"/revoke", struct{}{})
	results, err = second.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 3)
	if err != nil {
		t.Fatal(err)
	}
	if len(results[0].Peers) != 0 {
		t.Fatalf("revoked appliance still a peer: %+v", results[0].Peers)
	}
}

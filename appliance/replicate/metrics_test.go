package replicate

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/dataembassy/embassy/protocol/api"
)

// TestMetrics: the counters on both ends after a replicated object, the
// lag and path gauges, and a removed peer's series gone.
func TestMetrics(t *testing.T) {
	p := newPKI(t)
	a := newNode(t, p, strings.Repeat("a", 32), Options{AntiEntropyEvery: time.Hour})
	b := newNode(t, p, strings.Repeat("b", 32), Options{AntiEntropyEvery: time.Hour})
	a.rep.SetPeers([]api.Peer{{ID: b.id, Endpoints: []string{b.addr}}})
	b.rep.SetPeers([]api.Peer{{ID: a.id, Endpoints: []string{a.addr}}})
	data := randomBytes(3000)
	name := put(t, a, "reg/data", data)
	waitFor(t, "replicated", 10*time.Second, func() bool { _, ok := b.store.Has("reg/data", name); return ok })
	waitFor(t, "zero lag", 5*time.Second, func() bool { return a.rep.Lag()[0].PendingObjects == 0 })

	sent := a.rep.metrics.sent.WithLabelValues(b.id)
	if got := testutil.ToFloat64(sent); got != 1 {
		t.Errorf("sent objects %v, want 1", got)
	}
	if got := testutil.ToFloat64(a.rep.metrics.sentBytes.WithLabelValues(b.id)); got != float64(len(data)) {
		t.Errorf("sent bytes %v, want %d", got, len(data))
	}
	srv := b.srv.Collectors()
	if got := testutil.ToFloat64(srv[0]); got != 1 {
		t.Errorf("received objects %v, want 1", got)
	}
	if got := testutil.ToFloat64(srv[1]); got != float64(len(data)) {
		t.Errorf("received bytes %v, want %d", got, len(data))
	}
	want := `
# HELP embassy_replication_path_up 1 when the network path to the peer answers.
# TYPE embassy_replication_path_up gauge
embassy_replication_path_up{endpoint="` + b.addr + `",peer="` + b.id + `"} 1
# HELP embassy_replication_pending_objects Objects waiting to be pushed to the peer.
# TYPE embassy_replication_pending_objects gauge
embassy_replication_pending_objects{peer="` + b.id + `"} 0
`
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(a.rep.Collectors()...)
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "embassy_replication_path_up", "embassy_replication_pending_objects"); err != nil {
		t.Fatal(err)
	}

	a.rep.SetPeers(nil)
	if n, err := testutil.GatherAndCount(reg); err != nil || n != 0 {
		t.Fatalf("%d series (%v) left after the peer was removed", n, err)
	}
}

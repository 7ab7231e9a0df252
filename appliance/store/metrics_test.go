package store

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestMetrics(t *testing.T) {
	s, _ := newStore(t, 2)
	name, data := object(t, 1000)
	if _, err := s.Put(ns, name, data); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, err := s.Get(ns, name); err != nil {
			t.Fatal(err)
		}
	}
	s.MarkFailed("b", "pulled out")
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(s.Collectors()...)
	want := `
# HELP embassy_store_degraded 1 when a disk is not healthy.
# TYPE embassy_store_degraded gauge
embassy_store_degraded 1
# HELP embassy_store_disk_healthy 1 when the disk is healthy.
# TYPE embassy_store_disk_healthy gauge
embassy_store_disk_healthy{disk="a",state="healthy"} 1
embassy_store_disk_healthy{disk="b",state="failed"} 0
# HELP embassy_store_gets_total Verified object reads.
# TYPE embassy_store_gets_total counter
embassy_store_gets_total 3
# HELP embassy_store_peer_healed_total Objects whose every local copy failed, fetched from a peer.
# TYPE embassy_store_peer_healed_total counter
embassy_store_peer_healed_total 0
# HELP embassy_store_puts_total Objects acknowledged.
# TYPE embassy_store_puts_total counter
embassy_store_puts_total 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"embassy_store_degraded", "embassy_store_disk_healthy", "embassy_store_gets_total",
		"embassy_store_peer_healed_total", "embassy_store_puts_total"); err != nil {
		t.Fatal(err)
	}
	if n := testutil.CollectAndCount(s.Collectors()[3], "embassy_store_disk_read_errors_total"); n != 2 {
		t.Fatalf("%d disks with a read error counter, want 2", n)
	}
}

package store

import (
	"fmt"
	"io"
)

// WriteMetrics writes the store's metrics in the Prometheus text format.
func (s *Store) WriteMetrics(w io.Writer) {
	disks, degraded := s.Status()
	fmt.Fprintln(w, "# HELP embassy_store_puts_total Objects acknowledged.")
	fmt.Fprintln(w, "# TYPE embassy_store_puts_total counter")
	fmt.Fprintf(w, "embassy_store_puts_total %d\n", s.puts.Load())
	fmt.Fprintln(w, "# HELP embassy_store_gets_total Verified object reads.")
	fmt.Fprintln(w, "# TYPE embassy_store_gets_total counter")
	fmt.Fprintf(w, "embassy_store_gets_total %d\n", s.gets.Load())
	fmt.Fprintln(w, "# HELP embassy_store_peer_healed_total Objects whose every local copy failed, fetched from a peer.")
	fmt.Fprintln(w, "# TYPE embassy_store_peer_healed_total counter")
	fmt.Fprintf(w, "embassy_store_peer_healed_total %d\n", s.peerHealed.Load())
	fmt.Fprintln(w, "# HELP embassy_store_degraded 1 when a disk is not healthy.")
	fmt.Fprintln(w, "# TYPE embassy_store_degraded gauge")
	deg := 0
	if degraded {
		deg = 1
	}
	fmt.Fprintf(w, "embassy_store_degraded %d\n", deg)
	fmt.Fprintln(w, "# HELP embassy_store_disk_healthy 1 when the disk is healthy.")
	fmt.Fprintln(w, "# TYPE embassy_store_disk_healthy gauge")
	for _, d := range disks {
		h := 0
		if d.State == Healthy {
			h = 1
		}
		fmt.Fprintf(w, "embassy_store_disk_healthy{disk=%q,state=%q} %d\n", d.ID, d.State, h)
	}
	fmt.Fprintln(w, "# HELP embassy_store_disk_read_errors_total Failed or unverifiable reads per disk.")
	fmt.Fprintln(w, "# TYPE embassy_store_disk_read_errors_total counter")
	for _, d := range disks {
		fmt.Fprintf(w, "embassy_store_disk_read_errors_total{disk=%q} %d\n", d.ID, d.ReadErrors)
	}
	fmt.Fprintln(w, "# HELP embassy_store_disk_healed_total Copies rewritten from a good copy per disk.")
	fmt.Fprintln(w, "# TYPE embassy_store_disk_healed_total counter")
	for _, d := range disks {
		fmt.Fprintf(w, "embassy_store_disk_healed_total{disk=%q} %d\n", d.ID, d.Healed)
	}
}

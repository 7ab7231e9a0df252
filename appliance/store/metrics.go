package store

import "github.com/prometheus/client_golang/prometheus"

// metrics are the store's counters.
type metrics struct {
	puts, gets, peerHealed prometheus.Counter
}

func newMetrics() metrics {
	return metrics{
		puts:       prometheus.NewCounter(prometheus.CounterOpts{Name: "embassy_store_puts_total", Help: "Objects acknowledged."}),
		gets:       prometheus.NewCounter(prometheus.CounterOpts{Name: "embassy_store_gets_total", Help: "Verified object reads."}),
		peerHealed: prometheus.NewCounter(prometheus.CounterOpts{Name: "embassy_store_peer_healed_total", Help: "Objects whose every local copy failed, fetched from a peer."}),
	}
}

var (
	degradedDesc   = prometheus.NewDesc("embassy_store_degraded", "1 when a disk is not healthy.", nil, nil)
	diskHealthy    = prometheus.NewDesc("embassy_store_disk_healthy", "1 when the disk is healthy.", []string{"disk", "state"}, nil)
	diskReadErrors = prometheus.NewDesc("embassy_store_disk_read_errors_total", "Failed or unverifiable reads per disk.", []string{"disk"}, nil)
	diskHealed     = prometheus.NewDesc("embassy_store_disk_healed_total", "Copies rewritten from a good copy per disk.", []string{"disk"}, nil)
	diskFull       = prometheus.NewDesc("embassy_store_disk_full", "1 when the last write to the disk found no space.", []string{"disk"}, nil)
	repoBytes      = prometheus.NewDesc("embassy_store_repository_bytes", "Bytes a repository with a quota holds.", []string{"repository"}, nil)
	repoQuota      = prometheus.NewDesc("embassy_store_repository_quota_bytes", "A repository's quota.", []string{"repository"}, nil)
)

// Collectors returns the store's metrics, for a registry of the caller's.
func (s *Store) Collectors() []prometheus.Collector {
	return []prometheus.Collector{s.metrics.puts, s.metrics.gets, s.metrics.peerHealed, disksCollector{s}}
}

// disksCollector reports the disks as they are at the scrape: disks come
// and go (pulled out, replaced), and their counters live with them.
type disksCollector struct{ s *Store }

func (c disksCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{degradedDesc, diskHealthy, diskReadErrors, diskHealed, diskFull, repoBytes, repoQuota} {
		ch <- d
	}
}

func (c disksCollector) Collect(ch chan<- prometheus.Metric) {
	disks, degraded := c.s.Status()
	ch <- prometheus.MustNewConstMetric(degradedDesc, prometheus.GaugeValue, boolValue(degraded))
	for _, d := range disks {
		ch <- prometheus.MustNewConstMetric(diskHealthy, prometheus.GaugeValue, boolValue(d.State == Healthy), d.ID, string(d.State))
		ch <- prometheus.MustNewConstMetric(diskReadErrors, prometheus.CounterValue, float64(d.ReadErrors), d.ID)
		ch <- prometheus.MustNewConstMetric(diskHealed, prometheus.CounterValue, float64(d.Healed), d.ID)
		ch <- prometheus.MustNewConstMetric(diskFull, prometheus.GaugeValue, boolValue(d.Full), d.ID)
	}
	used, limit := c.s.Usage()
	for repo, l := range limit {
		ch <- prometheus.MustNewConstMetric(repoBytes, prometheus.GaugeValue, float64(used[repo]), repo)
		ch <- prometheus.MustNewConstMetric(repoQuota, prometheus.GaugeValue, float64(l), repo)
	}
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

package replicate

import "github.com/prometheus/client_golang/prometheus"

// replicatorMetrics are the replicator's per-peer counters; a peer's series
// go when the peer goes.
type replicatorMetrics struct {
	sent, sentBytes, fetched, failures, conflicts *prometheus.CounterVec
}

func newReplicatorMetrics() *replicatorMetrics {
	vec := func(name, help string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, []string{"peer"})
	}
	return &replicatorMetrics{
		sent:      vec("embassy_replication_sent_objects_total", "Objects pushed to the peer."),
		sentBytes: vec("embassy_replication_sent_bytes_total", "Bytes of objects pushed to the peer."),
		fetched:   vec("embassy_replication_fetched_objects_total", "Objects only the peer had, fetched from it by anti-entropy."),
		failures:  vec("embassy_replication_failures_total", "Pushes that failed and are retried."),
		conflicts: vec("embassy_replication_conflicts_total", "Objects the peer refused for good, and named objects that differ."),
	}
}

func (m *replicatorMetrics) vecs() []*prometheus.CounterVec {
	return []*prometheus.CounterVec{m.sent, m.sentBytes, m.fetched, m.failures, m.conflicts}
}

// attach gives a new peer its counters, starting at zero.
func (m *replicatorMetrics) attach(p *peer) {
	m.forget(p.id)
	p.sent = m.sent.WithLabelValues(p.id)
	p.sentBytes = m.sentBytes.WithLabelValues(p.id)
	p.pulled = m.fetched.WithLabelValues(p.id)
	p.failures = m.failures.WithLabelValues(p.id)
	p.conflicts = m.conflicts.WithLabelValues(p.id)
}

// forget drops a removed peer's series.
func (m *replicatorMetrics) forget(id string) {
	for _, v := range m.vecs() {
		v.DeleteLabelValues(id)
	}
}

var (
	pendingObjects = prometheus.NewDesc("embassy_replication_pending_objects", "Objects waiting to be pushed to the peer.", []string{"peer"}, nil)
	pendingBytes   = prometheus.NewDesc("embassy_replication_pending_bytes", "Bytes of objects waiting to be pushed to the peer.", []string{"peer"}, nil)
	oldestPending  = prometheus.NewDesc("embassy_replication_oldest_pending_seconds", "Age of the oldest object waiting for the peer.", []string{"peer"}, nil)
	pathUp         = prometheus.NewDesc("embassy_replication_path_up", "1 when the network path to the peer answers.", []string{"peer", "endpoint"}, nil)
)

// Collectors returns the replicator's metrics, for a registry of the
// caller's: per-peer counters, and the lag and paths as they are at the
// scrape.
func (r *Replicator) Collectors() []prometheus.Collector {
	out := []prometheus.Collector{lagCollector{r}}
	for _, v := range r.metrics.vecs() {
		out = append(out, v)
	}
	return out
}

// lagCollector reports what waits for each peer and which paths are up.
type lagCollector struct{ r *Replicator }

func (c lagCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{pendingObjects, pendingBytes, oldestPending, pathUp} {
		ch <- d
	}
}

func (c lagCollector) Collect(ch chan<- prometheus.Metric) {
	for _, h := range c.r.Lag() {
		ch <- prometheus.MustNewConstMetric(pendingObjects, prometheus.GaugeValue, float64(h.PendingObjects), h.ID)
		ch <- prometheus.MustNewConstMetric(pendingBytes, prometheus.GaugeValue, float64(h.PendingBytes), h.ID)
		ch <- prometheus.MustNewConstMetric(oldestPending, prometheus.GaugeValue, h.OldestSeconds, h.ID)
	}
	for _, p := range c.r.peerList() {
		for _, pa := range p.paths {
			up := 0.0
			if pa.up.Load() {
				up = 1
			}
			ch <- prometheus.MustNewConstMetric(pathUp, prometheus.GaugeValue, up, p.id, pa.endpoint)
		}
	}
}

// serverMetrics are the replication server's inbound counters.
type serverMetrics struct {
	received, receivedBytes, refused prometheus.Counter
}

func newServerMetrics() *serverMetrics {
	return &serverMetrics{
		received:      prometheus.NewCounter(prometheus.CounterOpts{Name: "embassy_replication_received_objects_total", Help: "Objects stored from peers."}),
		receivedBytes: prometheus.NewCounter(prometheus.CounterOpts{Name: "embassy_replication_received_bytes_total", Help: "Bytes of objects stored from peers."}),
		refused:       prometheus.NewCounter(prometheus.CounterOpts{Name: "embassy_replication_refused_total", Help: "Requests refused: no attested certificate, or not a peer."}),
	}
}

// Collectors returns the server's metrics (after Init), for a registry of
// the caller's.
func (s *Server) Collectors() []prometheus.Collector {
	m := s.metrics
	return []prometheus.Collector{m.received, m.receivedBytes, m.refused}
}

package ingest

import "github.com/prometheus/client_golang/prometheus"

// metrics are the server's counters.
type metrics struct {
	requests, rejected, bytesIn prometheus.Counter
	duration                    prometheus.Histogram
}

// counters returns the server's metrics, made on first use (a Server is a
// struct literal).
func (s *Server) counters() *metrics {
	s.metricsOnce.Do(func() {
		s.metrics = &metrics{
			requests: prometheus.NewCounter(prometheus.CounterOpts{Name: "embassy_ingest_requests_total", Help: "Requests to the restic REST service."}),
			rejected: prometheus.NewCounter(prometheus.CounterOpts{Name: "embassy_ingest_rejected_total", Help: "Requests answered with an error."}),
			bytesIn:  prometheus.NewCounter(prometheus.CounterOpts{Name: "embassy_ingest_bytes_total", Help: "Bytes of objects stored."}),
			duration: prometheus.NewHistogram(prometheus.HistogramOpts{
				Name:    "embassy_ingest_request_duration_seconds",
				Help:    "Time to answer a request, until its object is durable on every healthy disk.",
				Buckets: prometheus.ExponentialBuckets(0.001, 4, 8), // 1 ms to 16 s
			}),
		}
	})
	return s.metrics
}

// Collectors returns the server's metrics, for a registry of the caller's.
func (s *Server) Collectors() []prometheus.Collector {
	m := s.counters()
	return []prometheus.Collector{m.requests, m.rejected, m.bytesIn, m.duration}
}

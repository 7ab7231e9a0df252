package broker

import (
	"errors"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/dataembassy/embassy/protocol/api"
)

// Metric label values.
const (
	resultOK   = "ok"
	resultFail = "fail"
	reasonNone = "none"
)

// metrics are one broker's Prometheus metrics, in a registry of its own
// (served at api.PathMetrics on the operator API).
type metrics struct {
	registry     *prometheus.Registry
	attestations *prometheus.CounterVec
	released     prometheus.Counter
	auditAppends prometheus.Counter
	refusedOps   prometheus.Counter
	requests     *prometheus.HistogramVec
}

// newMetrics registers the broker's metrics; nonces reports the number of
// outstanding nonces when scraped.
func newMetrics(nonces func() int) *metrics {
	m := &metrics{
		registry: prometheus.NewRegistry(),
		attestations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "embassy_broker_attestations_total",
			Help: "Attestations answered, by result (ok, fail) and the refusal's code (none when ok).",
		}, []string{"result", "reason"}),
		released: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "embassy_broker_shares_released_total",
			Help: "Key shares released, sealed to an attested appliance's EK and PCRs.",
		}),
		auditAppends: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "embassy_broker_audit_appends_total",
			Help: "Entries appended to the audit log.",
		}),
		refusedOps: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "embassy_broker_custodian_refusals_total",
			Help: "Operator API handshakes refused: a client certificate this broker's custodian CA did not issue, or a revoked custodian's.",
		}),
		requests: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "embassy_broker_request_duration_seconds",
			Help:    "Time to answer an API request, by route and HTTP status.",
			Buckets: prometheus.DefBuckets,
		}, []string{"route", "code"}),
	}
	m.registry.MustRegister(m.attestations, m.released, m.auditAppends, m.refusedOps, m.requests,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "embassy_broker_nonces_outstanding",
			Help: "Nonces issued and neither used nor evicted yet.",
		}, func() float64 { return float64(nonces()) }),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return m
}

// attested counts an attestation's outcome.
func (m *metrics) attested(err error) {
	if err == nil {
		m.attestations.WithLabelValues(resultOK, reasonNone).Inc()
		return
	}
	code := api.CodeInternal
	var r *Rejection
	if errors.As(err, &r) {
		code = r.Code()
	}
	m.attestations.WithLabelValues(resultFail, string(code)).Inc()
}

// timed records the latency of the requests h answers under route, a mux
// pattern (never the raw URL, so the label set stays bounded).
func (m *metrics) timed(route string, h http.HandlerFunc) http.Handler {
	return promhttp.InstrumentHandlerDuration(m.requests.MustCurryWith(prometheus.Labels{"route": route}), h)
}

// handler serves the metrics in the Prometheus exposition format.
func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{})
}

package objectio

import (
	"fmt"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// DefaultBudget is the bytes of uploads the appliance holds in memory at
// once, ingest and replication together: room for one object of the
// largest size and a few restic packs beside it, on an appliance of 1 GiB.
const DefaultBudget = 256 << 20

// Budget bounds the bytes of uploads held in memory at once across the
// servers that share it. A nil *Budget bounds nothing.
type Budget struct {
	mu    sync.Mutex
	limit int64
	used  int64

	inUse   prometheus.GaugeFunc
	refused prometheus.Counter
}

// NewBudget makes a budget of limit bytes.
func NewBudget(limit int64) *Budget {
	b := &Budget{limit: limit}
	b.inUse = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "embassy_upload_bytes_in_flight",
		Help: "Bytes of uploads held in memory now (ingest and replication)."}, func() float64 { return float64(b.Used()) })
	b.refused = prometheus.NewCounter(prometheus.CounterOpts{Name: "embassy_upload_refused_busy_total",
		Help: "Uploads refused with 503 because the upload budget was spent."})
	return b
}

// Collectors are the budget's metrics.
func (b *Budget) Collectors() []prometheus.Collector {
	return []prometheus.Collector{b.inUse, b.refused}
}

// Used returns the bytes reserved now.
func (b *Budget) Used() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}

// Reserve takes n bytes of the budget, or answers ErrBusy at once when
// they are not free (an upload never waits holding a connection). The
// release function gives them back; it may be called more than once.
func (b *Budget) Reserve(n int64) (release func(), err error) {
	if b == nil {
		return func() {}, nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if n > b.limit {
		return nil, fmt.Errorf("%w: %d bytes exceed the whole upload budget of %d", ErrTooLarge, n, b.limit)
	}
	if b.used+n > b.limit {
		b.refused.Inc()
		return nil, fmt.Errorf("%w: %d bytes asked, %d of %d in use", ErrBusy, n, b.used, b.limit)
	}
	b.used += n
	var once sync.Once
	return func() {
		once.Do(func() {
			b.mu.Lock()
			b.used -= n
			b.mu.Unlock()
		})
	}, nil
}

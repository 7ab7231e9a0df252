package broker_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"time"

	"github.com/dataembassy/embassy/protocol/api"
)

// A rogue broker answers the operators what it likes. forgeHealth makes
// broker i such a broker for health: its operator API's state answer has
// every appliance record passed through forge, which may rewrite the
// health report (nil stops forging). Every other request, and what the
// broker does, stays the broker's own, so its revocations and share
// destructions are still counted where they happen.
func (e *env) forgeHealth(i int, forge func(a *api.Appliance)) {
	if forge == nil {
		e.brokers[i].forge.Store(nil)
		return
	}
	e.brokers[i].forge.Store(&forge)
}

// operatorHandler is broker rb's operator API, with its state answer
// forged while rb.forge is set.
func (rb *runningBroker) operatorHandler() http.Handler {
	h := rb.b.OperatorHandler()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		forge := rb.forge.Load()
		if forge == nil || r.Method != http.MethodGet || r.URL.Path != api.PathState {
			h.ServeHTTP(w, r)
			return
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, r)
		var st api.State
		if rec.Code != http.StatusOK || json.Unmarshal(rec.Body.Bytes(), &st) != nil {
			w.WriteHeader(rec.Code)
			w.Write(rec.Body.Bytes())
			return
		}
		for j := range st.Appliances {
			(*forge)(&st.Appliances[j])
		}
		json.NewEncoder(w).Encode(st)
	})
}

// lagClock restarts broker i with a clock that runs d behind the others:
// the health reports it stamps are d old as soon as they are made.
func (e *env) lagClock(i int, d time.Duration) {
	e.stop(i)
	e.brokers[i].cfg.Now = func() time.Time { return e.clock.now().Add(-d) }
	e.start(i)
}

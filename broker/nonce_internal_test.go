package broker

import (
	"fmt"
	"testing"
	"time"
)

// TestNonceCacheBounds checks the eviction rules one by one: an id's new
// nonce evicts that id's oldest, never another id's; unknown ids share a
// capped pool and are refused beyond it while known ids are not; expired
// nonces are dropped at the next sweep.
func TestNonceCacheBounds(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	const ttl = time.Minute
	type req struct {
		id    string
		known bool
		at    time.Duration // after now
	}
	many := func(id string, known bool, n int) []req {
		out := make([]req, n)
		for i := range out {
			out[i] = req{id: id, known: known}
		}
		return out
	}
	unknownIDs := func(n int) []req {
		out := make([]req, n)
		for i := range out {
			out[i] = req{id: fmt.Sprintf("unknown-%d", i)}
		}
		return out
	}
	tests := []struct {
		name     string
		reqs     []req
		refused  int            // requests refused
		held     map[string]int // nonces held per id afterwards
		evicted  []int          // indexes of requests whose nonce is gone
		retained []int          // indexes of requests whose nonce is held
	}{
		{"one id floods itself", append([]req{{id: "other", known: true}}, many("flood", false, 100)...), 0,
			map[string]int{"other": 1, "flood": MaxNoncesPerAppliance}, []int{1, 84}, []int{0, 85, 100}},
		{"a known id floods itself", append([]req{{id: "other", known: true}}, many("flood", true, 100)...), 0,
			map[string]int{"other": 1, "flood": MaxNoncesPerAppliance}, []int{1}, []int{0, 100}},
		{"unknown ids fill their pool", append(unknownIDs(MaxUnknownNonces+10), req{id: "enrolled", known: true}), 10,
			map[string]int{"enrolled": 1, "unknown-0": 1}, nil, []int{0, MaxUnknownNonces + 10}},
		{"expired nonces make room", append(unknownIDs(MaxUnknownNonces), req{id: "late", at: 2 * ttl}), 0,
			map[string]int{"late": 1, "unknown-0": 0}, []int{0}, []int{MaxUnknownNonces}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := newNonceCache()
			refused := 0
			for i, r := range tc.reqs {
				at := now.Add(r.at)
				if c.add(fmt.Sprint(i), nonceRecord{appliance: r.id, expires: at.Add(ttl), known: r.known}, at, ttl) != nil {
					refused++
				}
			}
			if refused != tc.refused {
				t.Errorf("%d requests refused, want %d", refused, tc.refused)
			}
			for id, n := range tc.held {
				if got := len(c.byID[id]); got != n {
					t.Errorf("%s holds %d nonces, want %d", id, got, n)
				}
			}
			for _, i := range tc.evicted {
				if _, ok := c.byNonce[fmt.Sprint(i)]; ok {
					t.Errorf("nonce of request %d still held", i)
				}
			}
			for _, i := range tc.retained {
				if _, ok := c.byNonce[fmt.Sprint(i)]; !ok {
					t.Errorf("nonce of request %d evicted", i)
				}
			}
			if total := len(c.byNonce); total > MaxUnknownNonces+MaxNoncesPerAppliance*len(c.byID) {
				t.Errorf("%d nonces held", total)
			}
		})
	}
}

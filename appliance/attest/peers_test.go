package attest

import (
	"fmt"
	"strings"
	"testing"

	"github.com/dataembassy/embassy/protocol/api"
)

func TestAgreedPeers(t *testing.T) {
	b := strings.Repeat("b", 32)
	c := strings.Repeat("c", 32)
	good := api.Peer{ID: b, Endpoints: []string{"10.0.2.2:9001", "10.0.3.2:9002"}}
	moved := api.Peer{ID: b, Endpoints: []string{"192.0.2.9:9001"}}
	rogue := api.Peer{ID: c, Endpoints: []string{"10.0.2.2:9999"}}
	bad := api.Peer{ID: "not-an-id", Endpoints: []string{"10.0.2.2:1"}}
	badEndpoint := api.Peer{ID: c, Endpoints: []string{"host.example:1"}}
	res := func(peers ...api.Peer) *Result { return &Result{Peers: peers} }
	cases := []struct {
		name    string
		results []*Result
		k       int
		want    string
	}{
		{"all agree", []*Result{res(good), res(good), res(good)}, 2, b},
		{"one broker adds a peer", []*Result{res(good, rogue), res(good), res(good)}, 2, b},
		{"endpoints differ", []*Result{res(good), res(moved), res(good)}, 2, b},
		{"no majority", []*Result{res(good), res(moved), res()}, 2, ""},
		{"listed twice by one broker", []*Result{res(rogue, rogue), res()}, 2, ""},
		{"malformed", []*Result{res(bad, badEndpoint), res(bad, badEndpoint)}, 2, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var ids []string
			for _, p := range AgreedPeers(tc.results, tc.k) {
				ids = append(ids, p.ID)
			}
			if got := strings.Join(ids, ","); got != tc.want {
				t.Fatalf("got %q, want %q (%s)", got, tc.want, fmt.Sprint(tc.results))
			}
		})
	}
}

package opclient_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/dataembassy/embassy/operator/opclient"
	"github.com/dataembassy/embassy/protocol/api"
)

const appID = "0123456789abcdef0123456789abcdef"

var now = time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)

// said is a broker's answer: its newest report of appID (nil: none), or
// unreachable, or no record of appID at all.
type said struct {
	broker  string
	h       *api.Health
	down    bool
	unknown bool
}

func states(answers ...said) []opclient.BrokerState {
	var out []opclient.BrokerState
	for _, a := range answers {
		switch {
		case a.down:
			out = append(out, opclient.BrokerState{Broker: a.broker, Error: "connection refused"})
		case a.unknown:
			out = append(out, opclient.BrokerState{Broker: a.broker, State: &api.State{}})
		default:
			out = append(out, opclient.BrokerState{Broker: a.broker, State: &api.State{Appliances: []api.Appliance{{ID: appID, Health: a.h}}}})
		}
	}
	return out
}

func report(ago time.Duration, pending ...int64) *api.Health {
	h := &api.Health{Reported: now.Add(-ago)}
	for i, p := range pending {
		h.Peers = append(h.Peers, api.PeerHealth{ID: string(rune('p' + i)), PendingBytes: p})
	}
	return h
}

// TestAgree: a claim holds only on k fresh reports that each show it;
// every other broker is named with why it does not count.
func TestAgree(t *testing.T) {
	fresh := opclient.Freshness{Now: now, Since: now.Add(-time.Minute), MaxAge: 5 * time.Minute}
	tests := []struct {
		name    string
		answers []said
		holds   bool
		dissent []string
		noSince bool // only the age bound applies
	}{
		{"k fresh drained reports", []said{{broker: "a", h: report(time.Second, 0)}, {broker: "b", h: report(2*time.Second, 0, 0)}}, true, nil, false},
		{"one drained, one pending", []said{{broker: "a", h: report(time.Second, 0)}, {broker: "b", h: report(time.Second, 7)}}, false,
			[]string{"b disagrees (0 objects / 7 bytes not yet on its peers)"}, false},
		{"one drained, one from before the command", []said{{broker: "a", h: report(time.Second, 0)}, {broker: "b", h: report(2*time.Minute, 0)}}, false,
			[]string{"b stale"}, false},
		{"too old for the bound", []said{{broker: "a", h: report(time.Second, 0)}, {broker: "b", h: report(10*time.Minute, 0)}}, false,
			[]string{"b stale (reported 10m0s ago, more than 5m0s)"}, true},
		{"from the future", []said{{broker: "a", h: report(time.Second, 0)}, {broker: "b", h: report(-time.Hour, 0)}}, false,
			[]string{"b stale (reported 2030-01-01T13:00:00Z, in the future)"}, false},
		{"no peers is not drained", []said{{broker: "a", h: report(time.Second)}, {broker: "b", h: report(time.Second)}}, false,
			[]string{"a disagrees (no peers)", "b disagrees (no peers)"}, false},
		{"a negative count cannot cancel a lag", []said{{broker: "a", h: report(time.Second, 0)}, {broker: "b", h: report(time.Second, 5, -5)}}, false,
			[]string{"b invalid"}, false},
		{"one broker listed twice counts once", []said{{broker: "a", h: report(time.Second, 0)}, {broker: "a", h: report(time.Second, 0)}}, false,
			[]string{"a listed twice"}, false},
		{"down, unknown, no report", []said{{broker: "a", h: report(time.Second, 0)}, {broker: "b", down: true}, {broker: "c", unknown: true}, {broker: "d"}}, false,
			[]string{"b unreachable", "c unknown appliance", "d no report"}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := fresh
			if tc.noSince {
				f.Since = time.Time{}
			}
			ag := opclient.Agree(states(tc.answers...), appID, 2, f, opclient.Drained)
			if ag.Holds != tc.holds {
				t.Fatalf("holds %v, want %v: %s", ag.Holds, tc.holds, ag)
			}
			dissent := strings.Join(ag.Dissent(), "; ")
			for _, want := range tc.dissent {
				if !strings.Contains(dissent, want) {
					t.Errorf("dissent %q does not name %q", dissent, want)
				}
			}
			if !tc.holds {
				err := error(&opclient.AgreementError{Agreement: ag})
				if !errors.Is(err, opclient.ErrNotAgreed) {
					t.Fatalf("%v is not %v", err, opclient.ErrNotAgreed)
				}
			}
		})
	}
}

// TestLastUnreplicated: a dead server's data counts as replicated only if
// k brokers' newest reports agree nothing was pending and no broker holds
// a newer report showing something pending; otherwise the most any
// report shows, and when, is given.
func TestLastUnreplicated(t *testing.T) {
	tests := []struct {
		name         string
		answers      []said
		clear, known bool
		bytes        int64
		broker       string
	}{
		{"k agree, old reports count", []said{{broker: "a", h: report(time.Hour, 0)}, {broker: "b", h: report(time.Hour, 0)}, {broker: "c", down: true}}, true, true, 0, ""},
		{"a newer report shows pending", []said{{broker: "a", h: report(time.Hour, 0)}, {broker: "b", h: report(time.Hour, 0)}, {broker: "c", h: report(time.Minute, 9)}}, false, true, 9, "c"},
		{"an older report's pending is past", []said{{broker: "a", h: report(time.Minute, 0)}, {broker: "b", h: report(time.Minute, 0)}, {broker: "c", h: report(time.Hour, 9)}}, true, true, 0, ""},
		{"one says nothing pending", []said{{broker: "a", h: report(time.Minute, 0)}, {broker: "b", h: report(time.Minute, 4)}, {broker: "c", h: report(time.Minute, 3, 3)}}, false, true, 6, "c"},
		{"no figure", []said{{broker: "a", h: report(time.Minute)}, {broker: "b"}, {broker: "c", down: true}}, false, false, 0, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			u := opclient.LastUnreplicated(states(tc.answers...), appID, 2, now)
			if u.Clear != tc.clear || u.Known != tc.known || u.Bytes != tc.bytes || u.Broker != tc.broker {
				t.Fatalf("%+v (%s), want clear %v known %v %d bytes from %q", u, u, tc.clear, tc.known, tc.bytes, tc.broker)
			}
			if tc.known && u.AsOf.IsZero() {
				t.Fatal("no time for a known figure")
			}
		})
	}
}

// TestOptionsChecked: a bound on report age that is negative or looser
// than MaxReportAgeLimit, a decommission that neither drains nor is
// forced, and a k beyond the list are refused before any broker is asked.
func TestOptionsChecked(t *testing.T) {
	c := opclient.New([]opclient.Broker{{Name: "a", URL: "https://127.0.0.1:1"}}, tls.Certificate{}, x509.NewCertPool())
	ctx := context.Background()
	other := "fedcba9876543210fedcba9876543210"
	tests := []struct {
		name string
		run  func() error
	}{
		{"negative report age", func() error {
			_, err := c.Decommission(ctx, appID, opclient.DecommissionOptions{Threshold: 1, Drain: time.Second, MaxReportAge: -time.Second})
			return err
		}},
		{"report age beyond the limit", func() error {
			_, err := c.Decommission(ctx, appID, opclient.DecommissionOptions{Threshold: 1, Drain: time.Second, MaxReportAge: opclient.MaxReportAgeLimit + 1})
			return err
		}},
		{"no drain and no force", func() error {
			_, err := c.Decommission(ctx, appID, opclient.DecommissionOptions{Threshold: 1})
			return err
		}},
		{"k beyond the list", func() error {
			_, err := c.Decommission(ctx, appID, opclient.DecommissionOptions{Threshold: 2, Force: true})
			return err
		}},
		{"replace: report age beyond the limit", func() error {
			_, err := c.Replace(ctx, appID, other, opclient.ReplaceOptions{Threshold: 1, MaxReportAge: 2 * opclient.MaxReportAgeLimit})
			return err
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.run(); !errors.Is(err, opclient.ErrBadOption) {
				t.Fatalf("%v, want %v", err, opclient.ErrBadOption)
			}
		})
	}
}

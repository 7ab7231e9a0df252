package opclient

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/dataembassy/embassy/protocol/api"
)

// Health reports reach the operator only through the brokers, and any one
// broker can answer what it likes. So nothing that destroys keys is
// decided on one broker's word: a claim about an appliance's health
// (drained, caught up) holds only when at least k brokers' own newest
// reports of that appliance, each fresh, show it (Agree).

// DefaultMaxReportAge is how old a health report may be and still count
// as fresh: three of the brokers' default re-attestation intervals (5 min).
const DefaultMaxReportAge = 15 * time.Minute

// MaxReportAgeLimit bounds MaxReportAge: four times the longest interval
// an appliance re-attests at (15 min). A report older than that says
// nothing about the appliance now.
const MaxReportAgeLimit = time.Hour

// ReportClockSkew is how far in the future (by the operator's clock) a
// broker's report time may be and still count.
const ReportClockSkew = time.Minute

// ErrBadOption is wrapped by every error about an option's value.
var ErrBadOption = errors.New("bad option")

// ErrNotAgreed: fewer than k brokers' fresh reports show a claim. It is
// wrapped by *AgreementError, which says what each broker's report showed.
var ErrNotAgreed = errors.New("fewer than k brokers' fresh reports agree")

// maxReportAge checks an option's report age bound; 0 is the default.
func maxReportAge(d time.Duration) (time.Duration, error) {
	switch {
	case d == 0:
		return DefaultMaxReportAge, nil
	case d < 0 || d > MaxReportAgeLimit:
		return 0, fmt.Errorf("%w: max report age %s: want more than 0 and at most %s", ErrBadOption, d, MaxReportAgeLimit)
	}
	return d, nil
}

// checkThreshold checks k against the broker list.
func (c *Client) checkThreshold(k int) error {
	if k < 1 || k > len(c.Brokers) {
		return fmt.Errorf("%w: threshold %d: want 1 to %d (the brokers in the list)", ErrBadOption, k, len(c.Brokers))
	}
	return nil
}

// Standing is how one broker's report of an appliance stands with a claim.
type Standing string

// The standings. Only StandingAgrees counts towards k.
const (
	StandingAgrees    Standing = "agrees"            // fresh, and shows the claim
	StandingDisagrees Standing = "disagrees"         // fresh, and does not show it
	StandingStale     Standing = "stale"             // too old, made before the command began, or from the future
	StandingInvalid   Standing = "invalid"           // a report that breaks the protocol's bounds
	StandingNoReport  Standing = "no report"         // knows the appliance, holds no health report of it
	StandingUnknown   Standing = "unknown appliance" // holds no record of the appliance
	StandingDown      Standing = "unreachable"       // did not answer
	StandingDuplicate Standing = "listed twice"      // a second entry of a broker already counted
)

// Freshness says which reports count: made after Since (when set), and
// at most MaxAge old at Now (when MaxAge is set; 0 takes a report of any
// age, such as a dead server's last one), and not more than
// ReportClockSkew after Now.
type Freshness struct {
	Now    time.Time
	Since  time.Time
	MaxAge time.Duration
}

// stale says why report time t does not count, or "".
func (f Freshness) stale(t time.Time) string {
	switch {
	case t.After(f.Now.Add(ReportClockSkew)):
		return fmt.Sprintf("reported %s, in the future", t.Format(time.RFC3339))
	case !f.Since.IsZero() && !t.After(f.Since):
		return fmt.Sprintf("reported %s, before %s", t.Format(time.RFC3339), f.Since.Format(time.RFC3339))
	case f.MaxAge > 0 && f.Now.Sub(t) > f.MaxAge:
		return fmt.Sprintf("reported %s ago, more than %s", f.Now.Sub(t).Round(time.Second), f.MaxAge)
	}
	return ""
}

// Claim is one statement about an appliance's health that k brokers'
// reports must each show.
type Claim struct {
	// What says the claim for people ("its peers hold everything it
	// stored").
	What string
	// Shows says whether report h shows the claim, and what h says.
	Shows func(h *api.Health) (bool, string)
}

// BrokerReport is one broker's newest health report of an appliance and
// how it stands with a claim.
type BrokerReport struct {
	Broker   string    `json:"broker"`
	Standing Standing  `json:"standing"`
	Reported time.Time `json:"reported,omitzero"`
	// Says is what the report shows, or why it does not count.
	Says   string      `json:"says,omitempty"`
	Health *api.Health `json:"-"`
}

// Agreement is how every broker's newest report of one appliance stands
// with a claim; the claim holds when at least Threshold of them agree.
type Agreement struct {
	ApplianceID string         `json:"appliance_id"`
	Claim       string         `json:"claim"`
	Threshold   int            `json:"threshold"`
	Holds       bool           `json:"holds"`
	Reports     []BrokerReport `json:"reports"` // one per broker, in list order
}

// Agreeing is the number of brokers whose fresh report shows the claim.
func (a *Agreement) Agreeing() int {
	n := 0
	for _, r := range a.Reports {
		if r.Standing == StandingAgrees {
			n++
		}
	}
	return n
}

// Dissent names every broker that does not count towards the claim, with
// its standing and what its report says.
func (a *Agreement) Dissent() []string {
	var out []string
	for _, r := range a.Reports {
		if r.Standing == StandingAgrees {
			continue
		}
		s := r.Broker + " " + string(r.Standing)
		if r.Says != "" {
			s += " (" + r.Says + ")"
		}
		out = append(out, s)
	}
	return out
}

// String says how many brokers agree and names the others.
func (a *Agreement) String() string {
	s := fmt.Sprintf("%d of %d brokers' newest reports show that %s %s (%d needed)", a.Agreeing(), len(a.Reports), a.ApplianceID, a.Claim, a.Threshold)
	if d := a.Dissent(); len(d) > 0 {
		s += ": " + strings.Join(d, "; ")
	}
	return s
}

// AgreementError is a claim that fewer than k brokers' fresh reports
// show. It wraps ErrNotAgreed.
type AgreementError struct{ Agreement *Agreement }

func (e *AgreementError) Error() string { return e.Agreement.String() }
func (e *AgreementError) Unwrap() error { return ErrNotAgreed }

// Agree weighs claim against appliance id's newest health report at
// every broker in states (one Status read): the claim holds only when at
// least k brokers' reports are fresh (f) and each shows it. A broker
// counts once, whatever its answer lists; a report that breaks the
// protocol's bounds counts for nothing.
func Agree(states []BrokerState, id string, k int, f Freshness, claim Claim) *Agreement {
	a := &Agreement{ApplianceID: id, Claim: claim.What, Threshold: k}
	seen := map[string]bool{}
	for _, st := range states {
		r := BrokerReport{Broker: st.Broker}
		switch {
		case seen[st.Broker]:
			r.Standing = StandingDuplicate
		case st.State == nil:
			r.Standing, r.Says = StandingDown, st.Error
		default:
			r.Standing = StandingUnknown
			for _, ap := range st.State.Appliances {
				if ap.ID != id {
					continue
				}
				if ap.Health == nil {
					if r.Standing == StandingUnknown {
						r.Standing = StandingNoReport
					}
					continue
				}
				if r.Health == nil || ap.Health.Reported.After(r.Health.Reported) {
					r.Health = ap.Health
				}
			}
		}
		seen[st.Broker] = true
		if h := r.Health; h != nil {
			r.Reported = h.Reported
			if err := checkReport(h); err != nil {
				r.Standing, r.Says = StandingInvalid, err.Error()
			} else if why := f.stale(h.Reported); why != "" {
				r.Standing, r.Says = StandingStale, why
			} else {
				ok, says := claim.Shows(h)
				r.Standing, r.Says = StandingDisagrees, says
				if ok {
					r.Standing = StandingAgrees
				}
			}
		}
		a.Reports = append(a.Reports, r)
	}
	a.Holds = k >= 1 && a.Agreeing() >= k
	return a
}

// Drained is the claim that an appliance's peers hold everything it
// stored: it names at least one peer, and has no object pending to any.
// A report without peers is not drained: nothing holds a copy.
var Drained = Claim{What: "its peers hold everything it stored", Shows: func(h *api.Health) (bool, string) {
	if len(h.Peers) == 0 {
		return false, "no peers"
	}
	objs, bytes := pendingOf(h)
	if objs == 0 && bytes == 0 {
		return true, fmt.Sprintf("nothing pending to %d peers", len(h.Peers))
	}
	return false, fmt.Sprintf("%d objects / %d bytes not yet on its peers", objs, bytes)
}}

// NoPeers is the claim that an appliance replicates to no peer.
var NoPeers = Claim{What: "has no peers", Shows: func(h *api.Health) (bool, string) {
	if len(h.Peers) == 0 {
		return true, "no peers"
	}
	return false, fmt.Sprintf("%d peers", len(h.Peers))
}}

// pendingOf sums a report's pending objects and bytes over its peers
// (checkReport refused negative counts).
func pendingOf(h *api.Health) (objs int, bytes int64) {
	for _, p := range h.Peers {
		objs += p.PendingObjects
		bytes += p.PendingBytes
	}
	return objs, bytes
}

// checkReport checks a report a broker passed on: the protocol's bounds,
// and no negative pending count (which could cancel another peer's lag
// out of a sum).
func checkReport(h *api.Health) error {
	if err := h.Validate(); err != nil {
		return err
	}
	for _, p := range h.Peers {
		if p.PendingObjects < 0 || p.PendingBytes < 0 {
			return fmt.Errorf("peer %q: negative pending count", p.ID)
		}
	}
	return nil
}

// Unreplicated is what an appliance's newest reports say about data it
// had stored but not yet replicated to its peers.
type Unreplicated struct {
	// Clear: at least k brokers' newest reports (of any age) show nothing
	// pending to its peers, and no broker holds a newer one that shows
	// something pending.
	Clear bool `json:"clear"`
	// Known: some broker's newest report gives a figure (it names peers).
	Known bool `json:"known"`
	// Bytes is the most any broker's newest report shows pending, made
	// at AsOf and held by Broker.
	Bytes  int64     `json:"bytes"`
	AsOf   time.Time `json:"as_of,omitzero"`
	Broker string    `json:"broker,omitempty"`
	// Agreement is how every broker's newest report stands with Drained.
	Agreement *Agreement `json:"agreement"`
}

// String says it for people.
func (u *Unreplicated) String() string {
	switch {
	case u.Clear:
		return fmt.Sprintf("nothing unreplicated (as of %s, agreed by %d brokers)", u.AsOf.Format(time.RFC3339), u.Agreement.Agreeing())
	case !u.Known:
		return "unknown: no broker holds a report of its replication (" + strings.Join(u.Agreement.Dissent(), "; ") + ")"
	}
	return fmt.Sprintf("%d bytes not yet on its peers as of %s (broker %s's report); %s", u.Bytes, u.AsOf.Format(time.RFC3339), u.Broker, u.Agreement)
}

// LastUnreplicated weighs appliance id's newest report at every broker,
// whatever its age (a dead server's last word), for data its peers lack.
// It is clear only when k brokers agree nothing was pending and no broker
// holds a newer report that shows something pending: a server that died
// part way through a round of attestations may have told only some
// brokers about its newest data, and losing data is not decided by
// majority.
func LastUnreplicated(states []BrokerState, id string, k int, now time.Time) *Unreplicated {
	ag := Agree(states, id, k, Freshness{Now: now}, Drained)
	u := &Unreplicated{Agreement: ag}
	for _, r := range ag.Reports {
		if r.Standing == StandingAgrees && r.Reported.After(u.AsOf) {
			u.AsOf = r.Reported
		}
	}
	agreedAt := u.AsOf
	u.Clear, u.Known = ag.Holds, ag.Holds
	for _, r := range ag.Reports {
		if r.Standing != StandingDisagrees || len(r.Health.Peers) == 0 {
			continue // agrees, or gives no figure
		}
		if ag.Holds && !r.Reported.After(agreedAt) {
			continue // older than what k brokers agree on
		}
		_, bytes := pendingOf(r.Health)
		if !u.Known || u.Clear || bytes > u.Bytes || bytes == u.Bytes && r.Reported.After(u.AsOf) {
			u.Bytes, u.AsOf, u.Broker = bytes, r.Reported, r.Broker
		}
		u.Clear, u.Known = false, true
	}
	if !u.Known {
		u.AsOf = time.Time{}
	}
	return u
}

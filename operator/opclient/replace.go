package opclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"time"

	"github.com/dataembassy/embassy/protocol/api"
)

// ErrNotCaughtUp: fewer than k brokers' fresh reports showed the new
// server caught up when the wait ran out; the old one was left as it was.
var ErrNotCaughtUp = errors.New("new server not caught up")

// ErrUnreplicated: the old server's newest reports do not show its peers
// holding everything it stored (some show bytes pending, or k brokers do
// not agree on nothing pending); Replace did not decommission it. It is
// wrapped by *UnreplicatedError.
var ErrUnreplicated = errors.New("the old server's data is not known to be on its peers")

// UnreplicatedError is Replace refusing to decommission an old server
// whose data its peers may lack. It wraps ErrUnreplicated.
type UnreplicatedError struct {
	OldID        string
	Unreplicated *Unreplicated
}

func (e *UnreplicatedError) Error() string {
	return fmt.Sprintf("old server %s: %v: %s; it was left as it was (accept the loss to decommission it anyway)", e.OldID, ErrUnreplicated, e.Unreplicated)
}
func (e *UnreplicatedError) Unwrap() error { return ErrUnreplicated }

// ReplaceOptions say how to replace a server.
type ReplaceOptions struct {
	// Threshold is k: every catch-up check holds only where k brokers'
	// fresh reports agree.
	Threshold int
	// CatchUp bounds the wait for the new server to hold everything.
	CatchUp time.Duration
	// Poll is how often the brokers are read while waiting (default 5 s).
	Poll time.Duration
	// Settle is how long the new server must look caught up without a
	// break before the old one is decommissioned (default 45 s: longer
	// than the twins' anti-entropy interval, so a pass has queued what
	// the new server lacks).
	Settle time.Duration
	// MaxReportAge is how old a health report may be and still count
	// (0: DefaultMaxReportAge; at most MaxReportAgeLimit).
	MaxReportAge time.Duration
	// AcceptLoss decommissions the old server even though its newest
	// reports do not show its peers holding everything it stored (the
	// operator's --accept-loss); the report says how much, as of when.
	AcceptLoss bool
	// Progress, if set, gets one line per check.
	Progress io.Writer
}

// ReplaceReport is the outcome of Replace.
type ReplaceReport struct {
	OldID, NewID string
	// Disks are the blank disks approved for the new server, Endpoints
	// the old server's endpoints it took over.
	Disks     int       `json:"disks"`
	Endpoints []string  `json:"endpoints"`
	Prepared  []Outcome `json:"prepared"`
	CaughtUp  bool      `json:"caught_up"`
	// CatchUp is how every broker's reports stood at the last check: the
	// new server's disks, then each twin's lag towards it.
	CatchUp []*Agreement `json:"catch_up,omitempty"`
	// OldUnreplicated is what the old server's newest reports said its
	// peers lacked, read just before it was to be decommissioned.
	OldUnreplicated *Unreplicated       `json:"old_unreplicated,omitempty"`
	Decommission    *DecommissionReport `json:"decommission,omitempty"`
}

// Replace puts a new server in an old one's place. The new server must be
// enrolled (at home, before shipping) at k brokers. At every broker it
// approves as many blank disks for the new server as the old one had and
// gives it the old one's endpoints (its twin and clients reach it where
// they reached the old one). Once k brokers' fresh reports (made since
// the replacement began) show the new server with all its disks healthy,
// and k brokers' fresh reports of every twin show nothing pending to it
// (its twin's anti-entropy filled it), the old server's newest reports
// are read: unless k brokers agree its peers lacked nothing (and no
// broker holds a newer report saying otherwise), it is left as it was
// (ErrUnreplicated) unless AcceptLoss. Then the old server is
// decommissioned without a drain (it is usually dead): revoked everywhere
// and its shares destroyed, so its disks can never be opened again. A new
// server that does not catch up in time is ErrNotCaughtUp, and the old one
// is left untouched.
func (c *Client) Replace(ctx context.Context, oldID, newID string, o ReplaceOptions) (*ReplaceReport, error) {
	for _, id := range []string{oldID, newID} {
		if err := api.CheckApplianceID(id); err != nil {
			return nil, err
		}
	}
	if oldID == newID {
		return nil, errors.New("old and new server are the same appliance")
	}
	if err := c.checkThreshold(o.Threshold); err != nil {
		return nil, err
	}
	age, err := maxReportAge(o.MaxReportAge)
	if err != nil {
		return nil, err
	}
	if o.Poll <= 0 {
		o.Poll = 5 * time.Second
	}
	if o.Settle <= 0 {
		o.Settle = 45 * time.Second
	}
	k := o.Threshold
	rep := &ReplaceReport{OldID: oldID, NewID: newID}
	enrolled := 0
	states := c.Status(ctx)
	for _, st := range states {
		if st.State == nil {
			continue
		}
		for _, a := range st.State.Appliances {
			switch a.ID {
			case oldID:
				rep.Disks = max(rep.Disks, len(a.Disks))
				if len(a.Endpoints) > len(rep.Endpoints) {
					rep.Endpoints = a.Endpoints
				}
			case newID:
				if a.Enrolled && !a.Revoked {
					enrolled++
				}
			}
		}
	}
	if enrolled < k {
		return rep, fmt.Errorf("new server %s is enrolled at %d brokers, %d needed: enroll it at home first", newID, enrolled, k)
	}
	if rep.Disks == 0 {
		return rep, fmt.Errorf("no broker holds shares of old server %s's disks: nothing to replace", oldID)
	}
	if o.Progress != nil {
		fmt.Fprintf(o.Progress, "old server %s: data its peers lacked: %s\n", oldID, LastUnreplicated(states, oldID, k, time.Now()))
	}
	began := time.Now()
	outs, err := c.ApproveDisks(ctx, newID, rep.Disks)
	rep.Prepared = append(rep.Prepared, outs...)
	if err != nil && CountOK(outs) < k {
		return rep, fmt.Errorf("approve %d disks for %s: %w", rep.Disks, newID, err)
	}
	if len(rep.Endpoints) > 0 {
		outs, err = c.SetEndpoints(ctx, newID, rep.Endpoints)
		rep.Prepared = append(rep.Prepared, outs...)
		if err != nil && CountOK(outs) < k {
			return rep, fmt.Errorf("give %s the endpoints of %s: %w", newID, oldID, err)
		}
	}
	deadline := began.Add(o.CatchUp)
	var since time.Time // caught up without a break since then
	for {
		var state string
		var caughtUp bool
		states = c.Status(ctx)
		state, caughtUp, rep.CatchUp = catchUp(states, oldID, newID, rep.Disks, k, Freshness{Now: time.Now(), Since: began, MaxAge: age})
		if !caughtUp {
			since = time.Time{}
		} else if since.IsZero() {
			since = time.Now()
		}
		if caughtUp && time.Since(since) >= o.Settle {
			rep.CaughtUp = true
			break
		}
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, "replacing %s by %s: %s (%s left)\n", oldID, newID, state, time.Until(deadline).Round(time.Second))
		}
		if time.Now().After(deadline) {
			return rep, fmt.Errorf("%w after %s: %s; %s was left as it was", ErrNotCaughtUp, o.CatchUp, state, oldID)
		}
		select {
		case <-ctx.Done():
			return rep, ctx.Err()
		case <-time.After(o.Poll):
		}
	}
	rep.OldUnreplicated = LastUnreplicated(c.Status(ctx), oldID, k, time.Now())
	if !rep.OldUnreplicated.Clear {
		if !o.AcceptLoss {
			return rep, &UnreplicatedError{OldID: oldID, Unreplicated: rep.OldUnreplicated}
		}
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, "old server %s: decommissioned although its peers may lack data (loss accepted): %s\n", oldID, rep.OldUnreplicated)
		}
	}
	rep.Decommission, err = c.Decommission(ctx, oldID, DecommissionOptions{Threshold: k, Force: true, MaxReportAge: age})
	return rep, err
}

// catchUp weighs one read of every broker: k brokers' fresh reports must
// show the new server with its disks in service and not degraded, and for
// every twin (any other unrevoked appliance with a fresh report at any
// broker), k brokers' fresh reports must show it replicating to the new
// server with nothing pending. It says what is missing otherwise, and how
// each broker's reports stood.
func catchUp(states []BrokerState, oldID, newID string, disks, k int, f Freshness) (string, bool, []*Agreement) {
	inService := Claim{What: fmt.Sprintf("has its %d disks in service, not degraded", disks), Shows: func(h *api.Health) (bool, string) {
		if h.Degraded || len(h.Disks) < disks {
			return false, fmt.Sprintf("%d of %d disks in service (degraded %v)", len(h.Disks), disks, h.Degraded)
		}
		return true, fmt.Sprintf("%d disks in service", len(h.Disks))
	}}
	nw := Agree(states, newID, k, f, inService)
	ags := []*Agreement{nw}
	if !nw.Holds {
		return "the new server: " + nw.String(), false, ags
	}
	twins := twinsOf(states, oldID, newID, f)
	if len(twins) == 0 {
		return "no twin has reported since the replacement began", false, ags
	}
	sent := Claim{What: "has nothing pending for the new server " + newID, Shows: func(h *api.Health) (bool, string) {
		for _, p := range h.Peers {
			switch {
			case p.ID != newID:
				continue
			case p.Path == "":
				return false, fmt.Sprintf("no working path to the new server (%s)", p.LastError)
			case p.PendingObjects != 0 || p.PendingBytes != 0:
				return false, fmt.Sprintf("%d objects (%d bytes) still for the new server", p.PendingObjects, p.PendingBytes)
			}
			return true, "nothing pending for the new server"
		}
		return false, "does not replicate to the new server yet"
	}}
	for _, id := range twins {
		ag := Agree(states, id, k, f, sent)
		ags = append(ags, ag)
		if !ag.Holds {
			return "twin " + ag.String(), false, ags
		}
	}
	return "caught up", true, ags
}

// twinsOf is every appliance other than the old and the new server that
// some broker holds enrolled, unrevoked and with a fresh report: one
// broker can add a twin to wait for, but none can take one away.
func twinsOf(states []BrokerState, oldID, newID string, f Freshness) []string {
	set := map[string]bool{}
	for _, st := range states {
		if st.State == nil {
			continue
		}
		for _, a := range st.State.Appliances {
			if a.ID == oldID || a.ID == newID || !a.Enrolled || a.Revoked || a.Health == nil || f.stale(a.Health.Reported) != "" {
				continue
			}
			if api.CheckApplianceID(a.ID) == nil {
				set[a.ID] = true
			}
		}
	}
	out := make([]string, 0, len(set))
	for id := range set {
		out = append(out, id)
	}
	sort.Strings(out)
	return out
}

// PrintReplace writes a report for people: what was prepared, the old
// server's unreplicated data, and its decommission.
func PrintReplace(w io.Writer, r *ReplaceReport) {
	PrintOutcomes(w, "prepare "+r.NewID, r.Prepared)
	for _, a := range r.CatchUp {
		fmt.Fprintf(w, "  %s\n", a)
	}
	if r.OldUnreplicated != nil {
		fmt.Fprintf(w, "old server %s: data its peers lacked: %s\n", r.OldID, r.OldUnreplicated)
	}
	if r.Decommission != nil {
		PrintDecommission(w, r.Decommission)
	}
}

// CountOK is the number of brokers whose outcome is ok.
func CountOK(outs []Outcome) int {
	n := 0
	for _, o := range outs {
		if o.OK {
			n++
		}
	}
	return n
}

package opclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/dataembassy/embassy/protocol/api"
)

// ErrNotCaughtUp: the new server had not caught up when the wait ran
// out; the old one was left as it was.
var ErrNotCaughtUp = errors.New("new server not caught up")

// ReplaceOptions say how to replace a server.
type ReplaceOptions struct {
	// Threshold is k.
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
	// Progress, if set, gets one line per check.
	Progress io.Writer
}

// ReplaceReport is the outcome of Replace.
type ReplaceReport struct {
	OldID, NewID string
	// Disks are the blank disks approved for the new server, Endpoints
	// the old server's endpoints it took over.
	Disks        int                 `json:"disks"`
	Endpoints    []string            `json:"endpoints"`
	Prepared     []Outcome           `json:"prepared"`
	CaughtUp     bool                `json:"caught_up"`
	Decommission *DecommissionReport `json:"decommission,omitempty"`
}

// Replace puts a new server in an old one's place. The new server must be
// enrolled (at home, before shipping) at k brokers. At every broker it
// approves as many blank disks for the new server as the old one had and
// gives it the old one's endpoints (its twin and clients reach it where
// they reached the old one). Once the new server has attested since the
// replacement began with all its disks healthy and every other appliance
// reports nothing pending to it (its twin's anti-entropy filled it), the
// old server is decommissioned without a drain (it is usually dead):
// revoked everywhere and its shares destroyed, so its disks can never be
// opened again. A new server that does not catch up in time is
// ErrNotCaughtUp, and the old one is left untouched.
func (c *Client) Replace(ctx context.Context, oldID, newID string, o ReplaceOptions) (*ReplaceReport, error) {
	for _, id := range []string{oldID, newID} {
		if err := api.CheckApplianceID(id); err != nil {
			return nil, err
		}
	}
	if oldID == newID {
		return nil, errors.New("old and new server are the same appliance")
	}
	if o.Threshold < 1 || o.Threshold > len(c.Brokers) {
		return nil, fmt.Errorf("threshold %d: want 1 to %d (the brokers in the list)", o.Threshold, len(c.Brokers))
	}
	if o.Poll <= 0 {
		o.Poll = 5 * time.Second
	}
	if o.Settle <= 0 {
		o.Settle = 45 * time.Second
	}
	rep := &ReplaceReport{OldID: oldID, NewID: newID}
	enrolled := 0
	for _, st := range c.Status(ctx) {
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
	if enrolled < o.Threshold {
		return rep, fmt.Errorf("new server %s is enrolled at %d brokers, %d needed: enroll it at home first", newID, enrolled, o.Threshold)
	}
	if rep.Disks == 0 {
		return rep, fmt.Errorf("no broker holds shares of old server %s's disks: nothing to replace", oldID)
	}
	began := time.Now()
	outs, err := c.ApproveDisks(ctx, newID, rep.Disks)
	rep.Prepared = append(rep.Prepared, outs...)
	if err != nil && CountOK(outs) < o.Threshold {
		return rep, fmt.Errorf("approve %d disks for %s: %w", rep.Disks, newID, err)
	}
	if len(rep.Endpoints) > 0 {
		outs, err = c.SetEndpoints(ctx, newID, rep.Endpoints)
		rep.Prepared = append(rep.Prepared, outs...)
		if err != nil && CountOK(outs) < o.Threshold {
			return rep, fmt.Errorf("give %s the endpoints of %s: %w", newID, oldID, err)
		}
	}
	deadline := began.Add(o.CatchUp)
	var since time.Time // caught up without a break since then
	for {
		state, caughtUp := c.caughtUp(ctx, oldID, newID, rep.Disks, began)
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
	rep.Decommission, err = c.Decommission(ctx, oldID, DecommissionOptions{Threshold: o.Threshold})
	return rep, err
}

// caughtUp reads every broker: the new server must have reported health
// since began with disks healthy and not degraded, and every other
// unrevoked appliance's newest report since began must show nothing
// pending to it. It says what is missing otherwise.
func (c *Client) caughtUp(ctx context.Context, oldID, newID string, disks int, began time.Time) (string, bool) {
	var newest *api.Health
	others := map[string]*api.Health{}
	for _, st := range c.Status(ctx) {
		if st.State == nil {
			continue
		}
		for _, a := range st.State.Appliances {
			h := a.Health
			if h == nil || !h.Reported.After(began) {
				continue
			}
			switch {
			case a.ID == newID:
				if newest == nil || h.Reported.After(newest.Reported) {
					newest = h
				}
			case a.ID != oldID && !a.Revoked && a.Enrolled:
				if o := others[a.ID]; o == nil || h.Reported.After(o.Reported) {
					others[a.ID] = h
				}
			}
		}
	}
	if newest == nil {
		return "the new server has not attested since the replacement began", false
	}
	if newest.Degraded || len(newest.Disks) < disks {
		return fmt.Sprintf("the new server has %d of %d disks in service (degraded %v)", len(newest.Disks), disks, newest.Degraded), false
	}
	if len(others) == 0 {
		return "no twin has reported since the replacement began", false
	}
	for id, h := range others {
		seen := false
		for _, p := range h.Peers {
			if p.ID != newID {
				continue
			}
			seen = true
			if p.Path == "" {
				return fmt.Sprintf("twin %s has no working path to the new server (%s)", id, p.LastError), false
			}
			if p.PendingObjects != 0 || p.PendingBytes != 0 {
				return fmt.Sprintf("twin %s still has %d objects (%d bytes) for the new server", id, p.PendingObjects, p.PendingBytes), false
			}
		}
		if !seen {
			return fmt.Sprintf("twin %s does not replicate to the new server yet", id), false
		}
	}
	return "caught up", true
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

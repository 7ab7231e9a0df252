package opclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/dataembassy/embassy/protocol/api"
)

// ErrNotDrained: fewer than k brokers' fresh reports (made after the
// decommission began) showed the appliance's peers holding everything it
// stored when the drain's time ran out, or they agree it has no peers
// (ErrNoPeers too); nothing was revoked. The error wraps the
// *AgreementError that names every broker that did not agree.
var ErrNotDrained = errors.New("appliance not drained")

// ErrNoPeers: k brokers' fresh reports agree the appliance replicates to
// no peer, so no copy of its data exists elsewhere and it can never be
// drained; only a forced decommission revokes it. Wrapped with
// ErrNotDrained.
var ErrNoPeers = errors.New("appliance has no peers")

// DecommissionOptions say how to take an appliance out of service.
type DecommissionOptions struct {
	// Threshold is k: the drain holds only where k brokers' fresh reports
	// agree, and a disk is unreadable once fewer than k brokers hold a
	// share of it.
	Threshold int
	// Drain bounds the wait for k brokers' reports, made after the
	// decommission began, to agree that the appliance's peers lack
	// nothing. It must be positive unless Force is set.
	Drain time.Duration
	// Force revokes without waiting for a drain (the operator's --force):
	// what the appliance's peers lack is lost. Without it, an appliance
	// with no peers is never drained.
	Force bool
	// MaxReportAge is how old a health report may be and still count
	// (0: DefaultMaxReportAge; at most MaxReportAgeLimit).
	MaxReportAge time.Duration
	// Poll is how often the brokers' status is read while draining
	// (default 2 s).
	Poll time.Duration
	// Progress, if set, gets one line per drain check.
	Progress io.Writer
}

// DiskFate is what became of one of the appliance's disks.
type DiskFate struct {
	ID string `json:"id"` // LUKS UUID, as the brokers know the disk
	// Serial is the serial that k brokers' newest reports give the disk
	// ("" where they do not agree).
	Serial string `json:"serial,omitempty"`
	// Holders are the brokers that may still hold a share: those that did
	// not confirm destroying it (unreachable ones included).
	Holders    []string `json:"holders"`
	Unreadable bool     `json:"unreadable"`
}

// DecommissionReport is the outcome of Decommission.
type DecommissionReport struct {
	ApplianceID string `json:"appliance_id"`
	// Drained: k brokers' fresh reports agreed its peers held everything.
	Drained bool `json:"drained"`
	// Drain is how every broker's newest report stood with that.
	Drain *Agreement `json:"drain,omitempty"`
	// Pending is what its newest reports said its peers lacked when it
	// was revoked, as of PendingAsOf (Unreplicated says who said it).
	Pending      int64         `json:"pending_bytes"`
	PendingAsOf  time.Time     `json:"pending_as_of,omitzero"`
	Unreplicated *Unreplicated `json:"unreplicated,omitempty"`
	Revoked      []Outcome     `json:"revoked"`
	Destroyed    []Destruction `json:"destroyed"`
	Disks        []DiskFate    `json:"disks"`
}

// Decommission takes an appliance out of service for good: it waits for
// the appliance to be drained (k brokers' reports, each made after the
// decommission began and at most MaxReportAge old, show peers that lack
// nothing it stored; no single broker's word is enough, and an appliance
// without peers is never drained), revokes it at every broker (it locks
// down at its next attestation and never enrolls again), and has every
// broker destroy its shares of the appliance's disks. The report says,
// per disk and serial, which brokers may still hold a share; a disk is
// unreadable once fewer than k do. A drain that does not finish in time
// is ErrNotDrained and changes nothing; Force skips the drain.
func (c *Client) Decommission(ctx context.Context, id string, o DecommissionOptions) (*DecommissionReport, error) {
	if err := api.CheckApplianceID(id); err != nil {
		return nil, err
	}
	if err := c.checkThreshold(o.Threshold); err != nil {
		return nil, err
	}
	age, err := maxReportAge(o.MaxReportAge)
	if err != nil {
		return nil, err
	}
	if o.Drain <= 0 && !o.Force {
		return nil, fmt.Errorf("%w: drain %s: give a positive drain time, or force", ErrBadOption, o.Drain)
	}
	if o.Poll <= 0 {
		o.Poll = 2 * time.Second
	}
	k := o.Threshold
	rep := &DecommissionReport{ApplianceID: id}
	began := time.Now()
	deadline := began.Add(o.Drain)
	var states []BrokerState
	for {
		states = c.Status(ctx)
		if err := knownAt(states, id); err != nil {
			return rep, err
		}
		f := Freshness{Now: time.Now(), Since: began, MaxAge: age}
		rep.Drain = Agree(states, id, k, f, Drained)
		if rep.Drain.Holds {
			rep.Drained = true
			break
		}
		if o.Force {
			break
		}
		if np := Agree(states, id, k, f, NoPeers); np.Holds {
			return rep, fmt.Errorf("%w: %w: %s; nothing was revoked (--force revokes it anyway, and what it stored is lost)", ErrNotDrained, ErrNoPeers, np)
		}
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, "draining %s: %s (%s left)\n", id, rep.Drain, time.Until(deadline).Round(time.Second))
		}
		if time.Now().After(deadline) {
			return rep, fmt.Errorf("%w after %s: %w; nothing was revoked (retry, or --force to revoke at once)", ErrNotDrained, o.Drain, &AgreementError{Agreement: rep.Drain})
		}
		select {
		case <-ctx.Done():
			return rep, ctx.Err()
		case <-time.After(o.Poll):
		}
	}
	rep.Unreplicated = LastUnreplicated(states, id, k, time.Now())
	if !rep.Drained {
		rep.Pending, rep.PendingAsOf = rep.Unreplicated.Bytes, rep.Unreplicated.AsOf
	}
	disks := disksOf(states, id, k)

	var errs []error
	if rep.Revoked, err = c.Revoke(ctx, id); err != nil {
		errs = append(errs, err)
	}
	if rep.Destroyed, err = c.DestroyShares(ctx, id); err != nil {
		errs = append(errs, err)
	}
	destroyedAt := map[string]map[string]bool{} // disk -> brokers that destroyed it
	for _, d := range rep.Destroyed {
		for _, disk := range d.Destroyed {
			if destroyedAt[disk] == nil {
				destroyedAt[disk] = map[string]bool{}
			}
			destroyedAt[disk][d.Broker] = true
			if _, ok := disks[disk]; !ok {
				disks[disk] = ""
			}
		}
	}
	for disk, serial := range disks {
		f := DiskFate{ID: disk, Serial: serial, Holders: []string{}}
		for _, b := range c.Brokers {
			if !destroyedAt[disk][b.Name] {
				f.Holders = append(f.Holders, b.Name)
			}
		}
		f.Unreadable = len(f.Holders) < o.Threshold
		rep.Disks = append(rep.Disks, f)
	}
	sort.Slice(rep.Disks, func(i, j int) bool { return rep.Disks[i].ID < rep.Disks[j].ID })
	return rep, errors.Join(errs...)
}

// ErrUnknownAppliance: no broker that answered knows the appliance.
var ErrUnknownAppliance = errors.New("no broker knows the appliance")

// ErrNoBroker: no broker answered.
var ErrNoBroker = errors.New("no broker answered")

// knownAt fails if no broker answered or none knows appliance id.
func knownAt(states []BrokerState, id string) error {
	var errs []string
	answered := 0
	for _, st := range states {
		if st.State == nil {
			errs = append(errs, st.Broker+": "+st.Error)
			continue
		}
		answered++
		for _, a := range st.State.Appliances {
			if a.ID == id {
				return nil
			}
		}
	}
	if answered == 0 {
		return fmt.Errorf("%w: %s", ErrNoBroker, strings.Join(errs, "; "))
	}
	return fmt.Errorf("%w: %s", ErrUnknownAppliance, id)
}

// disksOf is every disk any broker holds shares of for appliance id, each
// with the serial that k brokers' newest reports agree on ("" otherwise:
// one broker's word does not name a disk the host's staff then trust to
// be unreadable).
func disksOf(states []BrokerState, id string, k int) map[string]string {
	disks := map[string]string{}
	votes := map[string]map[string]int{} // disk -> serial -> brokers
	seen := map[string]bool{}
	for _, st := range states {
		if st.State == nil || seen[st.Broker] {
			continue
		}
		seen[st.Broker] = true
		var newest *api.Health
		for _, a := range st.State.Appliances {
			if a.ID != id {
				continue
			}
			for _, d := range a.Disks {
				disks[d] = ""
			}
			if a.Health != nil && (newest == nil || a.Health.Reported.After(newest.Reported)) {
				newest = a.Health
			}
		}
		if newest == nil || checkReport(newest) != nil {
			continue
		}
		named := map[string]bool{}
		for _, d := range newest.Disks {
			if d.UUID == "" || d.Serial == "" || named[d.UUID] {
				continue
			}
			named[d.UUID] = true
			if votes[d.UUID] == nil {
				votes[d.UUID] = map[string]int{}
			}
			votes[d.UUID][d.Serial]++
		}
	}
	for disk := range disks {
		agreed := 0
		for serial, n := range votes[disk] {
			if n >= k {
				disks[disk] = serial
				agreed++
			}
		}
		if agreed > 1 { // k brokers each for two serials: none is agreed
			disks[disk] = ""
		}
	}
	return disks
}

// PrintDecommission writes a report for people: per disk, its serial and
// whether it can ever be opened again.
func PrintDecommission(w io.Writer, r *DecommissionReport) {
	drained := "drained (its peers hold everything it stored)"
	if r.Drain != nil {
		drained = fmt.Sprintf("drained (%d brokers' fresh reports agree its peers hold everything it stored)", r.Drain.Agreeing())
	}
	if !r.Drained {
		drained = "NOT drained (forced)"
		if r.Unreplicated != nil {
			drained += "; data its peers lacked: " + r.Unreplicated.String()
		}
	}
	fmt.Fprintf(w, "appliance %s: %s\n", r.ApplianceID, drained)
	for _, o := range r.Revoked {
		fmt.Fprintf(w, "  revoked at %s: %s\n", o.Broker, okOr(o))
	}
	for _, d := range r.Destroyed {
		fmt.Fprintf(w, "  shares destroyed at %s: %s %v\n", d.Broker, okOr(d.Outcome), d.Destroyed)
	}
	for _, d := range r.Disks {
		serial := d.Serial
		if serial == "" {
			serial = "(serial not reported)"
		}
		state := "UNREADABLE for good"
		if !d.Unreadable {
			state = "still readable: shares may remain at " + strings.Join(d.Holders, ", ")
		}
		fmt.Fprintf(w, "  disk %s serial %s: %s\n", d.ID, serial, state)
	}
}

func okOr(o Outcome) string {
	if o.OK {
		return "ok"
	}
	return "FAILED: " + o.Error
}

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

// ErrNotDrained: the appliance still had data its twin lacks (or reported
// nothing since the decommission began) when the drain's time ran out;
// nothing was revoked.
var ErrNotDrained = errors.New("appliance not drained")

// DecommissionOptions say how to take an appliance out of service.
type DecommissionOptions struct {
	// Threshold is k: a disk is unreadable once fewer than k brokers hold
	// a share of it.
	Threshold int
	// Drain bounds the wait for the appliance to report, after the
	// decommission began, that its peers lack nothing (0: do not wait,
	// revoke at once; the operator's --force).
	Drain time.Duration
	// Poll is how often the brokers' status is read while draining
	// (default 2 s).
	Poll time.Duration
	// Progress, if set, gets one line per drain check.
	Progress io.Writer
}

// DiskFate is what became of one of the appliance's disks.
type DiskFate struct {
	ID     string `json:"id"`               // LUKS UUID, as the brokers know the disk
	Serial string `json:"serial,omitempty"` // from the appliance's last health report
	// Holders are the brokers that may still hold a share: those that did
	// not confirm destroying it (unreachable ones included).
	Holders    []string `json:"holders"`
	Unreadable bool     `json:"unreadable"`
}

// DecommissionReport is the outcome of Decommission.
type DecommissionReport struct {
	ApplianceID string        `json:"appliance_id"`
	Drained     bool          `json:"drained"`
	Pending     int64         `json:"pending_bytes"` // to its peers when revoked
	Revoked     []Outcome     `json:"revoked"`
	Destroyed   []Destruction `json:"destroyed"`
	Disks       []DiskFate    `json:"disks"`
}

// Decommission takes an appliance out of service for good: it waits for
// the appliance to be drained (its twin holds everything it stored:
// replication lag zero in a health report made after the decommission
// began), revokes it at every broker (it locks down at its next
// attestation and never enrolls again), and has every broker destroy its
// shares of the appliance's disks. The report says, per disk and serial,
// which brokers may still hold a share; a disk is unreadable once fewer
// than k do. A drain that does not finish in time is ErrNotDrained and
// changes nothing.
func (c *Client) Decommission(ctx context.Context, id string, o DecommissionOptions) (*DecommissionReport, error) {
	if err := api.CheckApplianceID(id); err != nil {
		return nil, err
	}
	if o.Threshold < 1 || o.Threshold > len(c.Brokers) {
		return nil, fmt.Errorf("threshold %d: want 1 to %d (the brokers in the list)", o.Threshold, len(c.Brokers))
	}
	if o.Poll <= 0 {
		o.Poll = 2 * time.Second
	}
	rep := &DecommissionReport{ApplianceID: id}
	disks := map[string]string{} // disk id -> serial
	began := time.Now()
	deadline := began.Add(o.Drain)
	for {
		known, health, err := c.applianceView(ctx, id)
		if err != nil {
			return rep, err
		}
		for _, d := range known {
			if _, ok := disks[d]; !ok {
				disks[d] = ""
			}
		}
		if health != nil {
			for _, d := range health.Disks {
				if _, ok := disks[d.UUID]; ok && d.Serial != "" {
					disks[d.UUID] = d.Serial
				}
			}
			rep.Pending = 0
			for _, p := range health.Peers {
				rep.Pending += p.PendingBytes
			}
		}
		fresh := health != nil && health.Reported.After(began)
		if fresh && rep.Pending == 0 && allCaughtUp(health) {
			rep.Drained = true
			break
		}
		if o.Drain == 0 {
			break
		}
		if o.Progress != nil {
			state := "no health report since the decommission began"
			if fresh {
				state = fmt.Sprintf("%d bytes not yet on its peers", rep.Pending)
			}
			fmt.Fprintf(o.Progress, "draining %s: %s (%s left)\n", id, state, time.Until(deadline).Round(time.Second))
		}
		if time.Now().After(deadline) {
			return rep, fmt.Errorf("%w: after %s: pending %d bytes; nothing was revoked (retry, or --force to revoke at once)", ErrNotDrained, o.Drain, rep.Pending)
		}
		select {
		case <-ctx.Done():
			return rep, ctx.Err()
		case <-time.After(o.Poll):
		}
	}

	var errs []error
	var err error
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

// allCaughtUp reports whether no peer has objects pending.
func allCaughtUp(h *api.Health) bool {
	for _, p := range h.Peers {
		if p.PendingObjects != 0 || p.PendingBytes != 0 {
			return false
		}
	}
	return true
}

// applianceView reads the appliance at every broker: the disks any broker
// holds shares of, and the newest health report any of them has. It fails
// only if no broker answers or none knows the appliance.
func (c *Client) applianceView(ctx context.Context, id string) ([]string, *api.Health, error) {
	var disks []string
	var health *api.Health
	answered, knows := 0, 0
	var errs []string
	for _, st := range c.Status(ctx) {
		if st.Error != "" {
			errs = append(errs, st.Broker+": "+st.Error)
			continue
		}
		answered++
		for _, a := range st.State.Appliances {
			if a.ID != id {
				continue
			}
			knows++
			disks = append(disks, a.Disks...)
			if a.Health != nil && (health == nil || a.Health.Reported.After(health.Reported)) {
				health = a.Health
			}
		}
	}
	if answered == 0 {
		return nil, nil, fmt.Errorf("no broker answered: %s", strings.Join(errs, "; "))
	}
	if knows == 0 {
		return nil, nil, fmt.Errorf("no broker knows appliance %s", id)
	}
	return disks, health, nil
}

// PrintDecommission writes a report for people: per disk, its serial and
// whether it can ever be opened again.
func PrintDecommission(w io.Writer, r *DecommissionReport) {
	drained := "drained (its peers hold everything it stored)"
	if !r.Drained {
		drained = fmt.Sprintf("NOT drained (forced; %d bytes were not yet on its peers)", r.Pending)
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

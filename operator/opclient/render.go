package opclient

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dataembassy/embassy/protocol/api"
)

// PrintJSON writes v as indented JSON.
func PrintJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// PrintOutcomes writes one line per broker.
func PrintOutcomes(w io.Writer, action string, outs []Outcome) {
	for _, o := range outs {
		if o.OK {
			fmt.Fprintf(w, "%-12s %s: ok\n", o.Broker, action)
		} else {
			fmt.Fprintf(w, "%-12s %s: FAILED: %s\n", o.Broker, action, o.Error)
		}
	}
}

// PrintDestructions writes, per broker, the disks whose shares it destroyed.
func PrintDestructions(w io.Writer, ds []Destruction) {
	for _, d := range ds {
		switch {
		case !d.OK:
			fmt.Fprintf(w, "%-12s destroy-shares: FAILED: %s\n", d.Broker, d.Error)
		case len(d.Destroyed) == 0:
			fmt.Fprintf(w, "%-12s destroy-shares: ok, no share held\n", d.Broker)
		default:
			fmt.Fprintf(w, "%-12s destroy-shares: ok, shares of %d disk(s) gone: %s\n", d.Broker, len(d.Destroyed), strings.Join(d.Destroyed, ", "))
		}
	}
}

// PrintStatus writes each broker's appliances and approved images.
func PrintStatus(w io.Writer, states []BrokerState) {
	for _, s := range states {
		if s.Error != "" {
			fmt.Fprintf(w, "%s: UNREACHABLE: %s\n\n", s.Broker, s.Error)
			continue
		}
		var versions []string
		for _, m := range s.State.Manifests {
			versions = append(versions, fmt.Sprint(m.Version))
		}
		fmt.Fprintf(w, "%s: approved images [%s]\n", s.Broker, strings.Join(versions, ", "))
		tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "  APPLIANCE\tSTATE\tIMAGE\tPENDING IMAGE\tFLOOR\tDISKS\tPENDING DISKS\tLAST ATTESTATION")
		for _, a := range s.State.Appliances {
			state := "enrolled"
			switch {
			case a.Revoked:
				state = "REVOKED"
			case !a.Activated:
				state = "awaiting activation"
			case !a.Enrolled:
				state = "awaiting approval"
			}
			last := "never"
			if !a.LastAttestation.IsZero() {
				last = time.Since(a.LastAttestation).Round(time.Second).String() + " ago"
			}
			pending := "-"
			if a.Health != nil && a.Health.Upgrade != nil && a.Health.Upgrade.Pending != 0 {
				pending = fmt.Sprint(a.Health.Upgrade.Pending)
			}
			fmt.Fprintf(tw, "  %s\t%s\t%d\t%s\t%d\t%d\t%d\t%s\n", a.ID, state, a.LastImage, pending, a.Floor, len(a.Disks), a.DiskApprovals, last)
		}
		tw.Flush()
		for _, a := range s.State.Appliances {
			printFirmware(w, a)
			printHealth(w, a)
		}
		fmt.Fprintln(w)
	}
}

// printFirmware writes an activated appliance's missing firmware
// reference and its pending firmware change, with how the events differ.
func printFirmware(w io.Writer, a api.Appliance) {
	if !a.Activated || (a.FirmwareReference && a.PendingFirmware == nil) {
		return
	}
	if !a.FirmwareReference {
		fmt.Fprintf(w, "  %s: NO FIRMWARE REFERENCE (refused until approve-firmware)\n", a.ID)
	}
	if p := a.PendingFirmware; p != nil {
		printPending(w, a.ID, p)
	}
}

func printPending(w io.Writer, id string, p *api.PendingFirmware) {
	pcrs := make([]string, len(p.PCRs))
	for i, n := range p.PCRs {
		pcrs[i] = fmt.Sprint(n)
	}
	fmt.Fprintf(w, "  %s: firmware change pending (PCRs %s, boot refused %s ago, digest %s; embassyctl approve-firmware --digest %s %s)\n", id,
		strings.Join(pcrs, ","), time.Since(p.Recorded).Round(time.Second), p.Digest, p.Digest, id)
	for _, d := range p.Differences {
		fmt.Fprintf(w, "    %s\n", d)
	}
}

// PrintFirmware writes each broker's firmware view of appliance id.
func PrintFirmware(w io.Writer, id string, states []FirmwareState) {
	for _, s := range states {
		switch {
		case s.Error != "":
			fmt.Fprintf(w, "%-12s firmware: %s\n", s.Broker, s.Error)
		case s.Pending == nil:
			ref := "reference held"
			if !s.Reference {
				ref = "NO reference"
			}
			fmt.Fprintf(w, "%-12s firmware: %s, no change pending\n", s.Broker, ref)
		default:
			fmt.Fprintf(w, "%-12s firmware:\n", s.Broker)
			printPending(w, id, s.Pending)
		}
	}
}

// printHealth writes an appliance's last self-report: disks by serial (for
// a technician's ticket), blank disks waiting for approval, replication lag
// per peer.
func printHealth(w io.Writer, a api.Appliance) {
	h := a.Health
	if h == nil {
		return
	}
	state := "healthy"
	if h.Degraded {
		state = "DEGRADED"
	}
	fmt.Fprintf(w, "  %s: store %s (reported %s ago), endpoints [%s]\n", a.ID, state,
		time.Since(h.Reported).Round(time.Second), strings.Join(a.Endpoints, ", "))
	for _, d := range h.Disks {
		reason := ""
		if d.Reason != "" {
			reason = " (" + d.Reason + ")"
		}
		fmt.Fprintf(w, "    disk serial %s %s: %s%s, read errors %d, healed %d\n", d.Serial, d.Device, d.State, reason, d.ReadErrors, d.Healed)
	}
	for _, d := range h.BlankDisks {
		fmt.Fprintf(w, "    disk serial %s %s: blank, waiting for approval (embassyctl approve-disk %s)\n", d.Serial, d.Device, a.ID)
	}
	for _, p := range h.Peers {
		errText := ""
		if p.LastError != "" {
			errText = ", last error: " + p.LastError
		}
		fmt.Fprintf(w, "    peer %s via %s: %d objects / %d bytes behind, oldest %.0fs%s\n", p.ID, p.Path, p.PendingObjects, p.PendingBytes, p.OldestSeconds, errText)
	}
}

// PrintAudit writes each broker's entries, each with who acted (the
// operator's certificate subject and fingerprint, or the appliance), or
// only the verdicts.
func PrintAudit(w io.Writer, logs []AuditLog, entries bool) {
	for _, l := range logs {
		verdict := "chain verified"
		if !l.Verified {
			verdict = "NOT VERIFIED: " + l.Error
		}
		fmt.Fprintf(w, "%s: %d entries, head %d %.16s…, %s\n", l.Broker, len(l.Entries), l.Head.Seq, l.Head.Hash, verdict)
		if !entries {
			continue
		}
		for _, e := range l.Entries {
			line := fmt.Sprintf("  %4d %s %-15s %-4s", e.Seq, e.Time.Format(time.RFC3339), e.Event, e.Result)
			if e.Appliance != "" {
				line += " " + e.Appliance
			}
			line += " by " + e.Actor.String()
			if e.Reason != "" {
				line += " reason=" + fmt.Sprintf("%q", e.Reason)
			}
			fmt.Fprintln(w, line)
		}
	}
}

// PrintHeadVerdicts writes one line per broker: ok with the head recorded,
// or the failure (REWRITTEN, ROLLED BACK, BAD SIGNATURE, CHAIN BROKEN, ...)
// and what differs.
func PrintHeadVerdicts(w io.Writer, verdicts []HeadVerdict) {
	for _, v := range verdicts {
		if v.OK() {
			fmt.Fprintf(w, "%-12s ok: %d entries, signed head %d %.16s…\n", v.Broker, v.Entries, v.Head.Seq, v.Head.Hash)
			continue
		}
		fmt.Fprintf(w, "%-12s %s: %s\n", v.Broker, v.Status, v.Detail)
	}
}

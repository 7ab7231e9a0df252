package opclient

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"
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
		fmt.Fprintln(tw, "  APPLIANCE\tSTATE\tIMAGE\tFLOOR\tDISKS\tPENDING DISKS\tLAST ATTESTATION")
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
			fmt.Fprintf(tw, "  %s\t%s\t%d\t%d\t%d\t%d\t%s\n", a.ID, state, a.LastImage, a.Floor, len(a.Disks), a.DiskApprovals, last)
		}
		tw.Flush()
		fmt.Fprintln(w)
	}
}

// PrintAudit writes each broker's entries, or only the verdicts.
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
			if e.Reason != "" {
				line += " reason=" + fmt.Sprintf("%q", e.Reason)
			}
			fmt.Fprintln(w, line)
		}
	}
}

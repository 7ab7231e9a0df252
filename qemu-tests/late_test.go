package qemutests

import (
	"context"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
)

// TestBrokersLate: a provisioned appliance boots while every broker is
// down and comes up by itself when they start 20 s later; booted with one
// broker only (below k=2) it stays locked, says why on the console and
// serves nothing.
func TestBrokersLate(t *testing.T) {
	parallelScenario(t, 1, 70*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	hb, cfg, _ := provisioned(t, "late")
	for i := range hb.b {
		hb.stop(i)
	}

	cfg.Name = "late-all-down"
	v := startVM(t, cfg)
	waitMsg(t, ctx, v, 0, logmsg.MsgIdentity)
	// The appliance found every broker down and keeps trying: two failed
	// attempts at each before they start.
	failed := map[string]int{}
	if _, _, err := v.WaitFor(ctx, 0, func(s string) bool {
		if bootreport.JSONMsg(s) == "attestation failed, retrying" {
			for _, name := range brokerNames {
				if strings.Contains(s, `"broker":"`+name+`"`) {
					failed[name]++
				}
			}
		}
		return len(failed) == len(brokerNames) && slices.Min(slices.Collect(maps.Values(failed))) >= 2
	}); err != nil {
		t.Fatalf("no failed attempts at every broker while they were down (%v): %v", failed, err)
	}
	for i := range hb.b {
		hb.serve(i)
	}
	waitMsg(t, ctx, v, 0, logmsg.MsgServing)
	v.Close()

	// One broker only.
	for i := 1; i < len(hb.b); i++ {
		hb.stop(i)
	}
	cfg.Name = "late-one-broker"
	v2 := startVM(t, cfg)
	_, _, err := v2.WaitFor(ctx, 0, func(s string) bool {
		return bootreport.JSONMsg(s) == "attestation below threshold; retrying" && strings.Contains(s, "1 of 3 brokers answered, 2 needed")
	})
	if err != nil {
		t.Fatalf("no below-threshold report on the console: %v", err)
	}
	for _, l := range v2.Lines() {
		switch bootreport.JSONMsg(l.Text) {
		case logmsg.MsgAttested, "volume unlocked and mounted", logmsg.MsgServing:
			t.Fatalf("got further than attestation with one broker: %s", l.Text)
		}
	}
	noIngest(t, cfg)
}

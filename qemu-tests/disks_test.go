package qemutests

import (
	"context"
	"encoding/json"
	"testing"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
	"github.com/dataembassy/embassy/qemu-tests/vm"
)

// waitMsg waits for a structured log line with msg on v's console (from
// line index from) and fails the test if the appliance halts first.
func waitMsg(t testing.TB, ctx context.Context, v *vm.VM, from int, msg string) (int, map[string]any) {
	t.Helper()
	i, line, err := v.WaitFor(ctx, from, func(s string) bool {
		m := bootreport.JSONMsg(s)
		return m == msg || m == logmsg.MsgHalted
	})
	if err != nil {
		t.Fatalf("waiting for %q: %v", msg, err)
	}
	var fields map[string]any
	json.Unmarshal([]byte(line.Text), &fields)
	if fields["msg"] == logmsg.MsgHalted {
		t.Fatalf("appliance halted: %s", line.Text)
	}
	return i, fields
}

// TestProvisionThenUnlock: a fresh server with two blank disks is enrolled
// and its disks approved; it provisions both (GPT, LUKS2, ext4, shares to
// all three brokers) and opens the mirrored store; after a power-off, with
// the same disks and TPM, it unlocks them with the released shares and no
// operator action. The first boot is the provisioned embassy's (twin-a's
// console and the brokers' state it left); the second boots a copy of it.
func TestProvisionThenUnlock(t *testing.T) {
	at := provisionedEmbassy(t)
	name := twinNames[0]
	st, opened := consoleMsg(t, at.firstBoot.consoles[name], logmsg.MsgStoreOpen)
	if n, _ := st["disks"].(float64); n != 2 || st["degraded"] != false || opened.Before(at.firstBoot.approved) {
		t.Fatalf("first boot store (opened %s, disks approved %s): %v", opened.Format("15:04:05.000"), at.firstBoot.approved.Format("15:04:05.000"), st)
	}
	for _, s := range at.firstBoot.brokers {
		held := 0
		for _, a := range s.Appliances {
			if a.ID == at.ids[name] {
				held = len(a.Disks)
			}
		}
		if held != 2 {
			t.Fatalf("%s holds shares of %d of %s's disks after its first boot, want 2", s.Broker, held, name)
		}
	}

	// Power on again: attest, get the shares, unlock, no operator action
	// (the reboot TestBusSnifferSeesNoShare records the TPM bus of).
	lines, _ := rebootToUnlock(t)
	att, _ := consoleMsg(t, lines, logmsg.MsgAttested)
	if n, _ := att["shares"].(float64); n < 4 {
		t.Fatalf("second boot got %v shares, want 2 disks x k=2", att["shares"])
	}
	st, _ = consoleMsg(t, lines, logmsg.MsgStoreOpen)
	if n, _ := st["disks"].(float64); n != 2 || st["degraded"] != false {
		t.Fatalf("second boot store: %v", st)
	}
}

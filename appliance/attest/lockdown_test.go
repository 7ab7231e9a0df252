package attest_test

import (
	"errors"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/appliance/attest/attesttest"
)

// TestSlowestBrokerLockdown: two brokers answer at once, the third only
// after a delay. A whole round (a re-attestation's) hears the third until
// the round's deadline: its lockdown ends the round even though k = 2
// answered first, its normal answer joins the round, and an answer later
// than the deadline is not waited for.
func TestSlowestBrokerLockdown(t *testing.T) {
	cases := []struct {
		name         string
		lockdown     bool
		delay        time.Duration
		wantLockdown bool
		wantResults  int
	}{
		{"slowest broker orders a lockdown", true, 300 * time.Millisecond, true, 0},
		{"slowest broker answers", false, 300 * time.Millisecond, false, 3},
		{"lockdown after the round's deadline", true, 5 * time.Second, false, 2},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			slow := &attesttest.Broker{Name: "broker-c", Lockdown: tc.lockdown, Delay: tc.delay}
			c := attesttest.NewClient(t, 2, &attesttest.Broker{Name: "broker-a"}, &attesttest.Broker{Name: "broker-b"}, slow)
			const deadline = 2 * time.Second
			start := time.Now()
			res, err := c.AttestAll(attesttest.Context(t, deadline), fastRetry, 2)
			if took := time.Since(start); took > deadline+time.Second {
				t.Fatalf("round took %s, past its deadline of %s", took, deadline)
			}
			var ld *attest.LockdownError
			if got := errors.As(err, &ld); got != tc.wantLockdown {
				t.Fatalf("lockdown %v (err %v), want %v", got, err, tc.wantLockdown)
			}
			if tc.wantLockdown && ld.Broker != "broker-c" {
				t.Fatalf("lockdown from %q, want broker-c", ld.Broker)
			}
			if !tc.wantLockdown && err != nil {
				t.Fatal(err)
			}
			if len(res) != tc.wantResults {
				t.Fatalf("%d results, want %d", len(res), tc.wantResults)
			}
		})
	}
}

// TestUnlockAtKLockdownLate: at boot the unlock goes on as soon as k
// brokers answered, before the slowest one has, and the slowest broker's
// answer still arrives through Late: a lockdown, or nothing to report.
func TestUnlockAtKLockdownLate(t *testing.T) {
	cases := []struct {
		name         string
		lockdown     bool
		wantLockdown bool
	}{
		{"slowest broker orders a lockdown", true, true},
		{"slowest broker answers", false, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			slow := &attesttest.Broker{Name: "broker-c", Lockdown: tc.lockdown, Delay: time.Second}
			c := attesttest.NewClient(t, 2, &attesttest.Broker{Name: "broker-a"}, &attesttest.Broker{Name: "broker-b"}, slow)
			res, late, err := c.AttestFirst(attesttest.Context(t, 10*time.Second), fastRetry, 2)
			if err != nil {
				t.Fatal(err)
			}
			if len(res) != 2 || slow.Answered() != 0 {
				t.Fatalf("%d results with the slowest broker's %d answers: the unlock waited", len(res), slow.Answered())
			}
			if late.Err() != nil {
				t.Fatalf("late answers reported before they came: %v", late.Err())
			}
			err = late.Wait()
			var ld *attest.LockdownError
			if got := errors.As(err, &ld); got != tc.wantLockdown || (!got && err != nil) {
				t.Fatalf("late answers: %v, want lockdown %v", err, tc.wantLockdown)
			}
			if tc.wantLockdown && ld.Broker != "broker-c" {
				t.Fatalf("lockdown from %q, want broker-c", ld.Broker)
			}
			if slow.Answered() != 1 {
				t.Fatalf("slowest broker answered %d times", slow.Answered())
			}
		})
	}
}

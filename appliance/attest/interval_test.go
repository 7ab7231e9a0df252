package attest_test

import (
	"math"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/appliance/attest/attesttest"
)

var fastRetry = attest.Backoff{Initial: 50 * time.Millisecond, Max: 200 * time.Millisecond}

const tenYears = 10 * 365 * 24 * 60 * 60

// TestBrokerIntervalBounded: whatever interval a broker answers, the
// client takes one inside [MinReattestAfter, MaxReattestAfter]: a broker
// can neither switch re-attestation (and so revocation) off with a huge
// interval nor make the appliance spin with zero or a negative one.
func TestBrokerIntervalBounded(t *testing.T) {
	cases := []struct {
		name    string
		seconds int
		want    time.Duration
	}{
		{"ten years", tenYears, attest.MaxReattestAfter},
		{"past time.Duration", math.MaxInt, attest.MaxReattestAfter},
		{"zero", 0, attest.MinReattestAfter},
		{"negative", -5, attest.MinReattestAfter},
		{"most negative", math.MinInt, attest.MinReattestAfter},
		{"inside the bounds", 120, 2 * time.Minute},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := attesttest.NewClient(t, 1, &attesttest.Broker{Name: "broker-a", ReattestAfter: tc.seconds})
			res, err := c.AttestAll(attesttest.Context(t, 10*time.Second), fastRetry, 1)
			if err != nil {
				t.Fatal(err)
			}
			if got := res[0].ReattestAfter; got != tc.want {
				t.Fatalf("broker answered %d s: interval %s, want %s", tc.seconds, got, tc.want)
			}
		})
	}
}

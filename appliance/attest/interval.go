package attest

import "time"

// Bounds of the re-attestation interval. Each broker answers an interval
// of its own (api.AttestResponse.ReattestAfter); the appliance clamps each
// answer to these bounds and re-attests after the smallest interval of the
// round (Round.ReattestAfter), so one broker can make re-attestation more
// frequent, down to the minimum, but never rarer than the maximum.
const (
	// MinReattestAfter keeps a broker that answers zero, a negative or a
	// tiny interval from making the appliance re-attest in a loop (a TPM
	// quote per broker and a round of requests to every broker each
	// time). It is the shortest interval used anywhere here (the QEMU
	// tests' brokers re-attest every 10 s).
	MinReattestAfter = 10 * time.Second
	// MaxReattestAfter bounds how long a revocation takes to reach a
	// serving appliance: whatever a broker answers (10 years switches
	// revocation off), the appliance re-attests within 15 minutes, and
	// within that plus one round's deadline hears a lockdown. It is
	// three times the brokers' default interval (5 minutes).
	MaxReattestAfter = 15 * time.Minute
)

// ReattestBounds bound a re-attestation interval.
type ReattestBounds struct{ Min, Max time.Duration }

// DefaultReattestBounds are [MinReattestAfter, MaxReattestAfter].
func DefaultReattestBounds() ReattestBounds {
	return ReattestBounds{Min: MinReattestAfter, Max: MaxReattestAfter}
}

// Clamp returns d inside the bounds (Max if they are crossed).
func (b ReattestBounds) Clamp(d time.Duration) time.Duration {
	return min(max(d, b.Min), b.Max)
}

// reattestAfter is a broker's answer in seconds as an interval inside the
// default bounds. It clamps before converting: a broker's count of
// seconds can overflow a time.Duration.
func reattestAfter(seconds int) time.Duration {
	lo, hi := int(MinReattestAfter/time.Second), int(MaxReattestAfter/time.Second)
	return time.Duration(min(max(seconds, lo), hi)) * time.Second
}

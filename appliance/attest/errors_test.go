package attest

import (
	"errors"
	"fmt"
	"testing"

	"github.com/dataembassy/embassy/protocol/api"
)

func TestIsUnknownAppliance(t *testing.T) {
	unknown := &BrokerError{Broker: "broker-a", Status: 404, Code: api.CodeUnknownAppliance, Message: "unknown appliance: x"}
	// The text alone does not count: only the code does.
	textOnly := &BrokerError{Broker: "broker-b", Status: 403, Code: api.CodeNotApproved, Message: "unknown appliance"}
	round := fmt.Errorf("%w: 0 of 2 brokers answered, 2 needed: %w", ErrBelowThreshold,
		brokerErrors{fmt.Errorf("broker-a: %w", unknown), fmt.Errorf("broker-b: %w", textOnly)})
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{"nil", nil, false},
		{"the refusal", unknown, true},
		{"wrapped", fmt.Errorf("attest: %w", unknown), true},
		{"in a round's error", round, true},
		{"other code with the same text", textOnly, false},
		{"plain error", errors.New("unknown appliance"), false},
	}
	for _, tc := range tests {
		if got := IsUnknownAppliance(tc.err); got != tc.want {
			t.Errorf("%s: IsUnknownAppliance = %v, want %v", tc.name, got, tc.want)
		}
	}
	if !errors.Is(round, ErrBelowThreshold) {
		t.Error("a round's error is not ErrBelowThreshold")
	}
	want := "not enough brokers: 0 of 2 brokers answered, 2 needed: broker-a: broker broker-a: 404 unknown appliance: x; broker-b: broker broker-b: 403 unknown appliance"
	if round.Error() != want {
		t.Errorf("round error text %q, want %q", round.Error(), want)
	}
}

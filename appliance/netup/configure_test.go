package netup

import (
	"errors"
	"fmt"
	"syscall"
	"testing"
)

func TestAlreadyConfigured(t *testing.T) {
	cases := []struct {
		name string
		err  error
		want bool
	}{
		{"route there already, as dhclient wraps it", fmt.Errorf("eth0: add default via 10.0.2.2: %w", syscall.EEXIST), true},
		{"address there already", fmt.Errorf("add/replace 10.0.2.15/24 to eth0: %w", syscall.EEXIST), true},
		{"no such device", fmt.Errorf("eth0: add route: %w", syscall.ENODEV), false},
		{"the word in a message only", errors.New("interface exists nowhere"), false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := alreadyConfigured(tc.err); got != tc.want {
				t.Fatalf("alreadyConfigured(%v) = %v, want %v", tc.err, got, tc.want)
			}
		})
	}
}

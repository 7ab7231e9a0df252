package opclient_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestLinkBoundaries keeps the command lines apart from the broker server:
// embassyctl (which links this package) must not link bbolt, and the
// appliance's PID 1 must link no package under broker/.
func TestLinkBoundaries(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go tool")
	}
	tests := []struct {
		cmd       string
		forbidden string
	}{
		{"github.com/dataembassy/embassy/cmd/embassyctl", "go.etcd.io/bbolt"},
		{"github.com/dataembassy/embassy/cmd/embassyctl", "github.com/dataembassy/embassy/broker\n"},
		{"github.com/dataembassy/embassy/cmd/embassy-init", "github.com/dataembassy/embassy/broker"},
	}
	for _, tc := range tests {
		out, err := exec.Command("go", "list", "-deps", tc.cmd).Output()
		if err != nil {
			t.Fatalf("go list -deps %s: %v", tc.cmd, err)
		}
		if strings.Contains(string(out), tc.forbidden) {
			t.Errorf("%s links %s", tc.cmd, strings.TrimSpace(tc.forbidden))
		}
	}
}

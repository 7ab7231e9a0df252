package cli_test

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/dataembassy/embassy/internal/cli"
	"github.com/dataembassy/embassy/internal/cli/embassyctl"
	"github.com/dataembassy/embassy/internal/cli/keybroker"
	"github.com/dataembassy/embassy/internal/cli/mkimage"
)

var trees = []struct {
	name string
	root func() *cobra.Command
	subs []string // subcommands --help must list
}{
	{"embassyctl", embassyctl.NewRootCmd, []string{"enroll", "approve-image", "set-endpoints", "set-floor", "approve-disk",
		"approve-firmware", "revoke", "attest", "status", "audit", "brokers", "completion"}},
	{"keybroker", keybroker.NewRootCmd, []string{"init", "serve", "completion"}},
	{"mkimage", mkimage.NewRootCmd, []string{"build", "verify", "completion"}},
}

// execute runs a fresh tree with args the way main does and returns its
// output and error.
func execute(root *cobra.Command, args ...string) (string, error) {
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SilenceErrors, root.SilenceUsage = true, true
	root.SetArgs(cli.LegacyArgs(root, args))
	err := root.Execute()
	return out.String(), err
}

func TestEveryCommandHasShortAndExample(t *testing.T) {
	for _, tr := range trees {
		for _, c := range cli.Walk(tr.root()) {
			t.Run(c.CommandPath(), func(t *testing.T) {
				if c.Short == "" {
					t.Error("no Short")
				}
				if c.Example == "" {
					t.Error("no Example")
				}
				if !strings.Contains(c.Example, c.CommandPath()) {
					t.Errorf("Example does not show %q:\n%s", c.CommandPath(), c.Example)
				}
			})
		}
	}
}

func TestHelpListsSubcommands(t *testing.T) {
	for _, tr := range trees {
		for _, flag := range []string{"--help", "-h"} {
			t.Run(tr.name+" "+flag, func(t *testing.T) {
				out, err := execute(tr.root(), flag)
				if err != nil {
					t.Fatalf("%s %s: %v", tr.name, flag, err)
				}
				for _, s := range tr.subs {
					if !strings.Contains(out, "\n  "+s+" ") {
						t.Errorf("%s %s does not list %q:\n%s", tr.name, flag, s, out)
					}
				}
			})
		}
	}
}

func TestSubcommandHelpHasExample(t *testing.T) {
	for _, tr := range trees {
		for _, c := range cli.Walk(tr.root()) {
			path := strings.Fields(c.CommandPath())[1:]
			t.Run(c.CommandPath(), func(t *testing.T) {
				out, err := execute(tr.root(), append(path, "--help")...)
				if err != nil {
					t.Fatal(err)
				}
				_, ex, ok := strings.Cut(out, "Examples:\n")
				if !ok || !strings.Contains(ex, c.CommandPath()) {
					t.Errorf("help without an example:\n%s", out)
				}
			})
		}
	}
}

func TestCompletionScripts(t *testing.T) {
	for _, tr := range trees {
		for _, shell := range []string{"bash", "zsh", "fish"} {
			out, err := execute(tr.root(), "completion", shell)
			if err != nil || !strings.Contains(out, tr.name) {
				t.Errorf("%s completion %s: %v, %d bytes", tr.name, shell, err, len(out))
			}
		}
	}
}

func TestUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		root func() *cobra.Command
		args []string
		want []string // in the error
	}{
		{keybroker.NewRootCmd, []string{"-h2"}, nil},
		{keybroker.NewRootCmd, []string{"frobnicate"}, []string{`unknown command "frobnicate"`, "keybroker --help"}},
		{mkimage.NewRootCmd, []string{"buld"}, []string{`unknown command "buld"`, "did you mean build?", "mkimage --help"}},
		{embassyctl.NewRootCmd, []string{"audit", "list"}, []string{`unknown command "list" for "embassyctl audit"`, "embassyctl audit --help"}},
		{embassyctl.NewRootCmd, []string{"enroll"}, []string{"enroll takes 1 argument(s), got 0", "embassyctl enroll APPLIANCE-ID"}},
		{mkimage.NewRootCmd, []string{"verify"}, []string{"verify takes 1 argument(s), got 0"}},
		{embassyctl.NewRootCmd, []string{"brokers", "add", "a", "http://x:1"}, []string{"https:// URL"}},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			_, err := execute(tc.root(), tc.args...)
			if err == nil {
				t.Fatal("no error")
			}
			if tc.want == nil {
				return
			}
			var ue *cli.UsageError
			if !errors.As(err, &ue) {
				t.Errorf("%v is not a UsageError", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
}

func TestLegacyArgs(t *testing.T) {
	root := embassyctl.NewRootCmd()
	for _, tc := range []struct{ in, want string }{
		{"-brokers b.json -json status", "--brokers b.json --json status"},
		{"audit verify -file a.log -head=1:ab", "audit verify --file a.log --head=1:ab"},
		{"approve-disk -count 2 id", "approve-disk --count 2 id"},
		{"-h", "-h"},
		{"--json status", "--json status"},
		{"enroll -notaflag", "enroll -notaflag"},
		{"enroll -- -json", "enroll -- -json"},
	} {
		got := strings.Join(cli.LegacyArgs(root, strings.Fields(tc.in)), " ")
		if got != tc.want {
			t.Errorf("LegacyArgs(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

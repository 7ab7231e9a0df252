// Package cli holds what the three command-line programs (embassyctl,
// keybroker, mkimage) share around their cobra command trees: running a tree
// with errors printed once and a non-zero exit, accepting the single-dash
// long flags (-out DIR) that scripts written for Go's flag package use, and
// errors that say which command to run next.
package cli

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/dataembassy/embassy/images/manifest"
)

// NextStep is an error that names what the user runs, or passes, to get
// past it: a missing image folder says which mkimage command creates it.
type NextStep struct {
	Err  error
	Next string // a sentence, e.g. "run `keybroker init --dir D ...` first"
}

func (e *NextStep) Error() string { return e.Err.Error() + "\n  next: " + e.Next }
func (e *NextStep) Unwrap() error { return e.Err }

// Next wraps err with the step that gets past it.
func Next(err error, format string, args ...any) error {
	return &NextStep{Err: err, Next: fmt.Sprintf(format, args...)}
}

// RequireImageDir fails with the mkimage command that makes dir an image
// folder when dir holds no manifest.
func RequireImageDir(dir string) error {
	if _, err := os.Stat(filepath.Join(dir, manifest.File)); errors.Is(err, fs.ErrNotExist) {
		return Next(fmt.Errorf("%s is not an image folder: %w", dir, err),
			"run `mkimage build --out %s` first", dir)
	}
	return nil
}

// CacheDir is the local-default cache folder: $EMBASSY_CACHE, else .cache.
func CacheDir() string {
	if c := os.Getenv("EMBASSY_CACHE"); c != "" {
		return c
	}
	return ".cache"
}

// Main runs root with args and returns the process exit code: 0, or 1 after
// printing "<name>: <error>" to stderr. Cobra's own error and usage printing
// is turned off so that every failure reads the same way.
func Main(root *cobra.Command, args []string, stderr io.Writer) int {
	root.SilenceErrors = true
	root.SilenceUsage = true
	root.SetArgs(LegacyArgs(root, args))
	if err := root.Execute(); err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", root.Name(), err)
		return 1
	}
	return 0
}

// LegacyArgs rewrites single-dash long flags that root's tree defines
// ("-out", "-json", "-head=SEQ:HASH") to pflag's double-dash form, so the
// invocations written for Go's flag package keep working. Arguments after
// "--" and anything that names no flag are left alone.
func LegacyArgs(root *cobra.Command, args []string) []string {
	names := map[string]bool{"help": true}
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		add := func(f *pflag.Flag) { names[f.Name] = true }
		c.Flags().VisitAll(add)
		c.PersistentFlags().VisitAll(add)
		for _, s := range c.Commands() {
			walk(s)
		}
	}
	walk(root)
	out := make([]string, 0, len(args))
	for i, a := range args {
		if a == "--" {
			return append(out, args[i:]...)
		}
		name, _, _ := strings.Cut(strings.TrimPrefix(a, "-"), "=")
		if strings.HasPrefix(a, "-") && !strings.HasPrefix(a, "--") && len(name) > 1 && names[name] {
			a = "-" + a
		}
		out = append(out, a)
	}
	return out
}

// ExactArgs is cobra.ExactArgs with the usage line in the error, so that a
// wrong count says what the command wants.
func ExactArgs(n int) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return &UsageError{Msg: fmt.Sprintf("%s takes %d argument(s), got %d; usage: %s",
				cmd.Name(), n, len(args), cmd.UseLine())}
		}
		return nil
	}
}

// Group makes cmd a command that only groups subcommands: without one it
// prints its help; with an unknown one it fails with the names it comes
// close to and where the list is.
func Group(cmd *cobra.Command) *cobra.Command {
	cmd.Args = func(c *cobra.Command, args []string) error {
		if len(args) == 0 {
			return nil
		}
		msg := fmt.Sprintf("unknown command %q for %q", args[0], c.CommandPath())
		if c.SuggestionsMinimumDistance <= 0 {
			c.SuggestionsMinimumDistance = 2
		}
		if s := c.SuggestionsFor(args[0]); len(s) > 0 {
			msg += fmt.Sprintf(" (did you mean %s?)", strings.Join(s, " or "))
		}
		return &UsageError{Msg: fmt.Sprintf("%s; run '%s --help' for the list of commands", msg, c.CommandPath())}
	}
	cmd.RunE = func(c *cobra.Command, _ []string) error { return c.Help() }
	cmd.DisableFlagsInUseLine = true
	return cmd
}

// UsageError is a command line that does not fit the command: an unknown
// subcommand or a wrong number of arguments.
type UsageError struct{ Msg string }

func (e *UsageError) Error() string { return e.Msg }

// Walk returns root and every command below it, depth first.
func Walk(root *cobra.Command) []*cobra.Command {
	out := []*cobra.Command{root}
	for _, c := range root.Commands() {
		out = append(out, Walk(c)...)
	}
	return out
}

// WithCompletion adds cobra's `completion` command (bash, zsh, fish,
// powershell) to root now, rather than at execution, and gives it and each
// shell's subcommand an example. Call it after the other subcommands are
// added.
func WithCompletion(root *cobra.Command) *cobra.Command {
	root.InitDefaultCompletionCmd()
	name := root.Name()
	for _, c := range root.Commands() {
		if c.Name() != "completion" {
			continue
		}
		c.Example = fmt.Sprintf("  source <(%[1]s completion bash)\n  %[1]s completion zsh > \"${fpath[1]}/_%[1]s\"", name)
		for _, sh := range c.Commands() {
			c := sh
			// cobra's own RunE writes to the output root had when the
			// command was added; write to the current one instead.
			c.RunE = func(c *cobra.Command, _ []string) error {
				return genCompletion(root, c.Name(), c.OutOrStdout(), !noDescriptions(c))
			}
			c.Run = nil
			switch c.Name() {
			case "bash", "zsh":
				c.Example = fmt.Sprintf("  source <(%s completion %s)", name, c.Name())
			case "fish":
				c.Example = fmt.Sprintf("  %[1]s completion fish > ~/.config/fish/completions/%[1]s.fish", name)
			default:
				c.Example = fmt.Sprintf("  %s completion %s | Out-String | Invoke-Expression", name, c.Name())
			}
		}
	}
	return root
}

func noDescriptions(c *cobra.Command) bool {
	v, _ := c.Flags().GetBool("no-descriptions")
	return v
}

func genCompletion(root *cobra.Command, shell string, w io.Writer, desc bool) error {
	switch shell {
	case "bash":
		return root.GenBashCompletionV2(w, desc)
	case "zsh":
		if desc {
			return root.GenZshCompletion(w)
		}
		return root.GenZshCompletionNoDesc(w)
	case "fish":
		return root.GenFishCompletion(w, desc)
	case "powershell":
		if desc {
			return root.GenPowerShellCompletionWithDesc(w)
		}
		return root.GenPowerShellCompletion(w)
	}
	return fmt.Errorf("no completion for shell %q", shell)
}

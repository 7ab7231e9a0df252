// Command embassyctl is the home-state operator's CLI for the key brokers.
// The command tree is in internal/cli/embassyctl; `embassyctl --help` lists
// its commands.
package main

import (
	"os"

	"github.com/dataembassy/embassy/internal/cli"
	"github.com/dataembassy/embassy/internal/cli/embassyctl"
)

func main() {
	os.Exit(cli.Main(embassyctl.NewRootCmd(), os.Args[1:], os.Stderr))
}

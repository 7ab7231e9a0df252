// Command keybroker runs one home-state key broker. The command tree is in
// internal/cli/keybroker; `keybroker --help` lists its commands.
package main

import (
	"os"

	"github.com/dataembassy/embassy/internal/cli"
	"github.com/dataembassy/embassy/internal/cli/keybroker"
)

func main() {
	os.Exit(cli.Main(keybroker.NewRootCmd(), os.Args[1:], os.Stderr))
}

// Command mkimage builds the immutable appliance image and its signed
// reference manifest, and verifies a built image. The command tree is in
// internal/cli/mkimage; `mkimage --help` lists its commands.
package main

import (
	"os"

	"github.com/dataembassy/embassy/internal/cli"
	"github.com/dataembassy/embassy/internal/cli/mkimage"
)

func main() {
	os.Exit(cli.Main(mkimage.NewRootCmd(), os.Args[1:], os.Stderr))
}

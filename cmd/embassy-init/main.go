// Command embassy-init is PID 1 of the appliance image: it runs the boot
// sequence of package initseq (pseudo-filesystems, kernel modules,
// measured-boot evidence, network, attestation to the key brokers, disks,
// then serving through package node until a lockdown) and logs every step
// as structured JSON on the serial console.
package main

import (
	stdlog "log"
	"log/slog"
	"os"

	"github.com/dataembassy/embassy/appliance/initseq"
)

func main() {
	h := slog.NewJSONHandler(os.Stdout, &slog.HandlerOptions{Level: slog.LevelInfo})
	// Libraries that use the standard logger (u-root's dhclient) log
	// through the structured handler too.
	stdlog.SetFlags(0)
	stdlog.SetOutput(slog.NewLogLogger(h, slog.LevelInfo).Writer())
	initseq.Run(slog.New(h))
}

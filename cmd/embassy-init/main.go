// Command embassy-init is PID 1 of the appliance image: it mounts the
// pseudo-filesystems, loads the image's kernel modules and reports the
// measured-boot evidence on the serial console, as structured JSON logs.
package main

import (
	"log/slog"
	"os"

	"github.com/dataembassy/embassy/appliance/initseq"
)

func main() {
	log := slog.New(slog.NewJSONHandler(os.Stdout, &slog.HandlerOptions{Level: slog.LevelInfo}))
	initseq.Run(log)
}

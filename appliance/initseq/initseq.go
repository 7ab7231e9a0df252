// Package initseq is the boot sequence run by embassy-init, PID 1 of the
// appliance. Every step is logged as structured JSON on the serial console.
// PID 1 never returns: on a fatal error it logs why and holds, serving
// nothing (fail closed).
package initseq

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/dataembassy/embassy/appliance/boot"
	"github.com/dataembassy/embassy/appliance/config"
	"github.com/dataembassy/embassy/appliance/measuredboot"
	"github.com/dataembassy/embassy/tpm/eventlog"
)

// Log messages the host side (tests, demo) looks for.
const (
	MsgStarting      = "embassy-init starting"
	MsgEvidence      = "measured boot evidence"
	MsgEventLogChunk = "event log chunk"
	MsgHalted        = "halted"
)

// ChunkSize is how many base64 characters of the event log go in one log line.
const ChunkSize = 3000

// Run executes the boot sequence and never returns.
func Run(log *slog.Logger) {
	start := time.Now()
	var info config.ImageInfoFile
	if b, err := os.ReadFile(config.ImageInfo); err == nil {
		_ = json.Unmarshal(b, &info)
	}
	log.Info(MsgStarting, "pid", os.Getpid(), "image_version", info.Version, "kernel_release", info.KernelRelease)

	if err := boot.MountPseudoFilesystems(log); err != nil {
		halt(log, "mount pseudo-filesystems", err)
	}
	log.Info("pseudo-filesystems mounted")

	names, err := boot.ReadModuleList(config.ModulesLoad)
	if err != nil {
		halt(log, "read module list", err)
	}
	if err := boot.LoadModules(log, names); err != nil {
		// Missing hardware drivers are not fatal; the disks and NICs that
		// matter are checked by the steps that use them.
		log.Warn("kernel modules", "err", err)
	}
	log.Info("kernel modules loaded", "count", len(names), "elapsed_ms", time.Since(start).Milliseconds())

	f, err := os.Open(config.Path)
	if err != nil {
		halt(log, "open image config", err)
	}
	cfg, err := config.Parse(f)
	f.Close()
	if err != nil {
		halt(log, "image config", err)
	}
	log.Info("image config", "brokers", len(cfg.Brokers), "threshold", cfg.Threshold)

	tpm, err := measuredboot.OpenTPM(10 * time.Second)
	if err != nil {
		halt(log, "open TPM", err)
	}
	ev, err := measuredboot.Collect(tpm)
	if err != nil {
		halt(log, "collect measured-boot evidence", err)
	}
	ReportEvidence(log, ev)
	log.Info("boot sequence complete", "elapsed_ms", time.Since(start).Milliseconds())
	hold()
}

// ReportEvidence logs the PCR values, a readable list of the PCR4 and PCR9
// events, and the raw event log in base64 chunks with its SHA-256, so the
// host can replay it.
func ReportEvidence(log *slog.Logger, ev *measuredboot.Evidence) {
	pcrs := map[string]string{}
	for i, v := range ev.PCRs {
		pcrs[fmt.Sprint(i)] = hex.EncodeToString(v)
	}
	var boot []eventlog.Event
	if evs, err := eventlog.Unverified(ev.EventLog); err == nil {
		for _, e := range evs {
			if e.PCR == 4 || e.PCR == 9 {
				boot = append(boot, e)
			}
		}
	} else {
		log.Warn("event log unreadable", "err", err)
	}
	sum := sha256.Sum256(ev.EventLog)
	enc := base64.StdEncoding.EncodeToString(ev.EventLog)
	chunks := (len(enc) + ChunkSize - 1) / ChunkSize
	log.Info(MsgEvidence, "pcrs", pcrs, "boot_events", boot,
		"event_log_bytes", len(ev.EventLog), "event_log_sha256", hex.EncodeToString(sum[:]), "chunks", chunks)
	for i := 0; i < chunks; i++ {
		end := min((i+1)*ChunkSize, len(enc))
		log.Info(MsgEventLogChunk, "seq", i, "data", enc[i*ChunkSize:end])
	}
}

func halt(log *slog.Logger, step string, err error) {
	log.Error(MsgHalted, "step", step, "err", err.Error())
	hold()
}

// hold keeps PID 1 alive forever: if init exits, the kernel panics.
func hold() {
	for {
		time.Sleep(time.Hour)
	}
}

// Package initseq is the boot sequence run by embassy-init, PID 1 of the
// appliance. Every step is logged as structured JSON on the serial console.
// PID 1 never returns: on a fatal error it logs why and holds, serving
// nothing (fail closed).
package initseq

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/appliance/boot"
	"github.com/dataembassy/embassy/appliance/config"
	"github.com/dataembassy/embassy/appliance/measuredboot"
	"github.com/dataembassy/embassy/appliance/netup"
	"github.com/dataembassy/embassy/broker/api"
	tpmclient "github.com/dataembassy/embassy/tpm/client"
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

	ctx := context.Background()
	if _, err := netup.Up(ctx, log); err != nil {
		halt(log, "network", err)
	}
	pool, err := loadPool(config.BrokerCAPath)
	if err != nil {
		halt(log, "broker CA bundle", err)
	}
	att, err := tpmclient.Open(tpm, tpmclient.EKRSA)
	if err != nil {
		halt(log, "TPM keys", err)
	}
	tlsKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		halt(log, "TLS key", err)
	}
	ac, err := attest.New(cfg, pool, att, tlsKey, func() ([]byte, error) { return os.ReadFile(measuredboot.EventLogPath) }, log)
	if err != nil {
		halt(log, "broker client", err)
	}
	log.Info(MsgIdentity, "appliance_id", ac.ID())
	results := attestLoop(ctx, log, ac, cfg)
	shares := 0
	for _, r := range results {
		shares += len(r.Shares)
	}
	log.Info(MsgAttested, "brokers", len(results), "image_version", results[0].ImageVersion,
		"shares", shares, "disk_approvals", results[0].DiskApprovals, "elapsed_ms", time.Since(start).Milliseconds())
	log.Info("boot sequence complete", "elapsed_ms", time.Since(start).Milliseconds())
	hold()
}

// Log messages of the attestation step.
const (
	MsgIdentity        = "appliance identity"
	MsgEnrollRequested = "enrollment requested"
	MsgAttested        = "attested"
	MsgLockdown        = "lockdown"
)

// attestLoop attests to the brokers until k answer. An appliance the
// brokers do not know asks to enroll (credential activation) once and then
// waits for the operators' approval; a lockdown order is logged and the
// appliance keeps trying, serving nothing meanwhile.
func attestLoop(ctx context.Context, log *slog.Logger, ac *attest.Client, cfg *config.Config) []*attest.Result {
	enrollAsked := false
	for {
		round, cancel := context.WithTimeout(ctx, 30*time.Second)
		results, err := ac.AttestAll(round, attest.Backoff{Initial: time.Second, Max: 5 * time.Second}, cfg.Threshold)
		cancel()
		if err == nil {
			return results
		}
		var ld *attest.LockdownError
		switch {
		case errors.As(err, &ld):
			log.Error(MsgLockdown, "broker", ld.Broker, "reason", ld.Reason)
		case !enrollAsked && strings.Contains(err.Error(), api.ReasonUnknownAppliance):
			if eerr := ac.Enroll(ctx); eerr != nil {
				log.Warn("enrollment request incomplete", "err", eerr.Error())
			} else {
				enrollAsked = true
				log.Info(MsgEnrollRequested, "appliance_id", ac.ID())
			}
		default:
			log.Warn("attestation below threshold; retrying", "err", err.Error())
		}
		time.Sleep(2 * time.Second)
	}
}

func loadPool(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	certs, err := config.ParseCertBundle(b)
	if err != nil {
		return nil, err
	}
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p, nil
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

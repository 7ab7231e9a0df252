package initseq

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/dataembassy/embassy/appliance/config"
	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/appliance/measuredboot"
	"github.com/dataembassy/embassy/tpm/eventlog"
)

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
	chunks := (len(enc) + logmsg.ChunkSize - 1) / logmsg.ChunkSize
	log.Info(logmsg.MsgEvidence, "pcrs", pcrs, "boot_events", boot,
		"event_log_bytes", len(ev.EventLog), "event_log_sha256", hex.EncodeToString(sum[:]), "chunks", chunks)
	for i := 0; i < chunks; i++ {
		end := min((i+1)*logmsg.ChunkSize, len(enc))
		log.Info(logmsg.MsgEventLogChunk, "seq", i, "data", enc[i*logmsg.ChunkSize:end])
	}
}

func halt(log *slog.Logger, step string, err error) {
	log.Error(logmsg.MsgHalted, "step", step, "err", err.Error())
	hold()
}

// hold keeps PID 1 alive forever: if init exits, the kernel panics.
func hold() {
	for {
		time.Sleep(time.Hour)
	}
}

// loadPool reads a PEM bundle of CA certificates.
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

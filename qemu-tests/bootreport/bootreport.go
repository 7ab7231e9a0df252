// Package bootreport reads the measured-boot evidence that embassy-init
// prints on the serial console and verifies it on the host: the event log is
// reassembled, checked against its announced SHA-256, replayed against the
// PCR values the guest read from its TPM, and its PCR4/PCR9 events are
// compared with the image manifest.
package bootreport

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/images/build"
	"github.com/dataembassy/embassy/images/manifest"
	"github.com/dataembassy/embassy/qemu-tests/vm"
	"github.com/dataembassy/embassy/tpm/eventlog"
)

// Evidence is what the guest reported.
type Evidence struct {
	PCRs           map[int][]byte
	EventLog       []byte
	ReportedEvents []eventlog.Event // the guest's own (unverified) view of PCR4/PCR9
}

type evidenceLine struct {
	Msg            string            `json:"msg"`
	PCRs           map[string]string `json:"pcrs"`
	BootEvents     []eventlog.Event  `json:"boot_events"`
	EventLogBytes  int               `json:"event_log_bytes"`
	EventLogSHA256 string            `json:"event_log_sha256"`
	Chunks         int               `json:"chunks"`
}

type chunkLine struct {
	Msg  string `json:"msg"`
	Seq  int    `json:"seq"`
	Data string `json:"data"`
}

// JSONMsg returns the "msg" of a JSON log line, or "".
func JSONMsg(line string) string {
	if !strings.HasPrefix(line, "{") {
		return ""
	}
	var m struct {
		Msg string `json:"msg"`
	}
	if json.Unmarshal([]byte(line), &m) != nil {
		return ""
	}
	return m.Msg
}

// Wait waits for the evidence on the console of v and parses it.
func Wait(ctx context.Context, v *vm.VM) (*Evidence, error) {
	i, line, err := v.WaitFor(ctx, 0, func(s string) bool {
		m := JSONMsg(s)
		return m == logmsg.MsgEvidence || m == logmsg.MsgHalted
	})
	if err != nil {
		return nil, fmt.Errorf("wait for measured-boot evidence: %w", err)
	}
	if JSONMsg(line.Text) == logmsg.MsgHalted {
		return nil, fmt.Errorf("appliance halted: %s", line.Text)
	}
	var head evidenceLine
	if err := json.Unmarshal([]byte(line.Text), &head); err != nil {
		return nil, fmt.Errorf("decode evidence line: %w", err)
	}
	if head.Chunks < 1 || head.Chunks > 1000 {
		return nil, fmt.Errorf("evidence announces %d event-log chunks", head.Chunks)
	}
	var enc strings.Builder
	next := i + 1
	for seq := 0; seq < head.Chunks; seq++ {
		j, l, err := v.WaitFor(ctx, next, func(s string) bool { return JSONMsg(s) == logmsg.MsgEventLogChunk })
		if err != nil {
			return nil, fmt.Errorf("wait for event-log chunk %d: %w", seq, err)
		}
		next = j + 1
		var c chunkLine
		if err := json.Unmarshal([]byte(l.Text), &c); err != nil {
			return nil, fmt.Errorf("decode chunk %d: %w", seq, err)
		}
		if c.Seq != seq {
			return nil, fmt.Errorf("event-log chunk %d arrived as %d", seq, c.Seq)
		}
		enc.WriteString(c.Data)
	}
	raw, err := base64.StdEncoding.DecodeString(enc.String())
	if err != nil {
		return nil, fmt.Errorf("decode event log: %w", err)
	}
	sum := sha256.Sum256(raw)
	if hex.EncodeToString(sum[:]) != head.EventLogSHA256 || len(raw) != head.EventLogBytes {
		return nil, fmt.Errorf("event log garbled on the console: %d bytes, sha256 %x; announced %d bytes, %s",
			len(raw), sum, head.EventLogBytes, head.EventLogSHA256)
	}
	ev := &Evidence{PCRs: map[int][]byte{}, EventLog: raw, ReportedEvents: head.BootEvents}
	for k, v := range head.PCRs {
		idx, err := strconv.Atoi(k)
		if err != nil {
			return nil, fmt.Errorf("PCR index %q: %w", k, err)
		}
		d, err := hex.DecodeString(v)
		if err != nil || len(d) != sha256.Size {
			return nil, fmt.Errorf("PCR %d value %q is not a SHA-256", idx, v)
		}
		ev.PCRs[idx] = d
	}
	return ev, nil
}

// Verdict is the host's judgement of one boot.
type Verdict struct {
	Events []eventlog.Event    // verified events of the image's PCRs (eventlog.ImagePCRs)
	Check  *eventlog.BootCheck // comparison with the manifest
}

// Verify replays the evidence and compares it with the manifest.
func Verify(ev *Evidence, m manifest.Measurements) (*Verdict, error) {
	events, err := eventlog.Replay(ev.EventLog, ev.PCRs)
	if err != nil {
		return nil, err
	}
	var boot []eventlog.Event
	for _, e := range events {
		if slices.Contains(eventlog.ImagePCRs, e.PCR) {
			boot = append(boot, e)
		}
	}
	return &Verdict{Events: boot, Check: eventlog.CheckBoot(events, m)}, nil
}

// ImageManifest reads and verifies the signed manifest of an image folder.
func ImageManifest(dir string, pub []byte) (*manifest.Manifest, error) {
	mb, err := os.ReadFile(filepath.Join(dir, manifest.File))
	if err != nil {
		return nil, err
	}
	sb, err := os.ReadFile(filepath.Join(dir, manifest.SignatureFile))
	if err != nil {
		return nil, err
	}
	return manifest.Verify(mb, sb, pub)
}

// BootConfig returns a VM config that boots the image in dir the way a
// server prepared at home boots it: OVMF's Secure Boot build with the
// image's firmware variables (the home state's keys enrolled, Secure Boot
// on), from the image's disk.
func BootConfig(name, dir string) vm.Config {
	return vm.Config{
		Name:       name,
		BootDisk:   filepath.Join(dir, manifest.ComponentDisk),
		SecureBoot: true,
		OVMFVars:   filepath.Join(dir, build.VarsFile),
	}
}

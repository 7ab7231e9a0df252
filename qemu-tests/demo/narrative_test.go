package demo

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/dataembassy/embassy/images/manifest"
	"github.com/dataembassy/embassy/internal/cli"
)

// A console as embassy-init prints it: the network library's log lines
// (whole DHCP lease dumps) arrive through the standard logger as JSON lines
// too, beside the story's own messages.
const console = `EFI stub: Loaded initrd from LINUX_EFI_INITRD_MEDIA_GUID device path
[    0.812345] Run /init as init process
{"time":"2026-01-01T00:00:00Z","level":"INFO","msg":"embassy-init starting","pid":1}
{"time":"2026-01-01T00:00:00Z","level":"INFO","msg":"kernel modules loaded","count":12}
{"time":"2026-01-01T00:00:01Z","level":"INFO","msg":"Attempting to get DHCPv4 lease on eth0"}
{"time":"2026-01-01T00:00:01Z","level":"INFO","msg":"Got DHCPv4 lease on eth0: DHCPv4 Message\n  opcode: BootReply\n  hwtype: Ethernet\n  options:\n    Subnet Mask: ffffff00\n    Router: 10.0.2.2"}
{"time":"2026-01-01T00:00:01Z","level":"INFO","msg":"network interface up","interface":"eth0","address":"10.0.2.15/24"}
{"time":"2026-01-01T00:00:02Z","level":"INFO","msg":"measured boot evidence","pcrs":{}}
{"time":"2026-01-01T00:00:02Z","level":"INFO","msg":"event log chunk","seq":0,"data":"AAAA"}
{"time":"2026-01-01T00:00:03Z","level":"INFO","msg":"appliance identity","appliance_id":"3f9c"}
{"time":"2026-01-01T00:00:03Z","level":"WARN","msg":"attestation below threshold; retrying","err":"not enrolled"}
{"time":"2026-01-01T00:00:04Z","level":"INFO","msg":"enrollment requested","appliance_id":"3f9c"}
{"time":"2026-01-01T00:00:09Z","level":"INFO","msg":"attested","image_version":1}
{"time":"2026-01-01T00:00:10Z","level":"ERROR","msg":"unlock failed","disk":"vdb","err":"no key"}
{"time":"2026-01-01T00:00:11Z","level":"INFO","msg":"store open","disks":2}
{"time":"2026-01-01T00:00:11Z","level":"INFO","msg":"ingest serving","port":8443}
`

func TestNarratorKeepsLibraryChatterOut(t *testing.T) {
	var out bytes.Buffer
	n := &narrator{out: &out, start: time.Now()}
	// the console arrives in arbitrary pieces
	for _, piece := range strings.SplitAfter(console, "o") {
		n.Write([]byte(piece))
	}
	got := regexp.MustCompile(`(?m)^  \+ *[0-9.]+s `).ReplaceAllString(out.String(), "")
	want := `kernel: Loaded initrd from LINUX_EFI_INITRD_MEDIA_GUID device path
appliance: embassy-init starting
appliance: measured boot evidence
appliance: appliance identity
appliance: enrollment requested
appliance: attested
appliance: unlock failed (disk=vdb, err=no key)
appliance: store open
appliance: ingest serving
`
	if got != want {
		t.Errorf("story:\n%s\nwant:\n%s", got, want)
	}
	for _, chatter := range []string{"DHCP", "opcode", "kernel modules", "event log chunk", "Run /init"} {
		if strings.Contains(out.String(), chatter) {
			t.Errorf("story carries %q", chatter)
		}
	}
}

func TestMissingInputsSayWhatToRun(t *testing.T) {
	tmp := t.TempDir()
	image := filepath.Join(tmp, "out")
	os.MkdirAll(image, 0o755)
	os.WriteFile(filepath.Join(image, manifest.File), []byte("{}"), 0o644)
	for _, tc := range []struct {
		name string
		o    Options
		next string
	}{
		{"no image", Options{Image: filepath.Join(tmp, "missing"), Bin: tmp}, "mkimage build --out"},
		{"no binaries", Options{Image: image, Bin: tmp}, "make bin"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := Run(context.Background(), tc.o)
			var ns *cli.NextStep
			if !errors.As(err, &ns) || !strings.Contains(ns.Next, tc.next) {
				t.Errorf("Run = %v, want a next step naming %q", err, tc.next)
			}
		})
	}
}

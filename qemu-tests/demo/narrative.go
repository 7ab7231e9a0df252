package demo

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
)

// storyMsg says whether an appliance log message is a step of the demo's
// story. Everything else on the console (DHCP lease dumps from the network
// library, module loading, event-log chunks, scrub and replication detail)
// stays in the console log file only.
func storyMsg(msg string) bool {
	switch msg {
	case logmsg.MsgStarting, logmsg.MsgEvidence, logmsg.MsgIdentity, logmsg.MsgEnrollRequested,
		logmsg.MsgAttested, logmsg.MsgStoreOpen, logmsg.MsgServing, logmsg.MsgStopped,
		logmsg.MsgBlankDisk, logmsg.MsgDiskFailed, logmsg.MsgDiskHealthy, logmsg.MsgLockdown, logmsg.MsgHalted:
		return true
	}
	return false
}

// narrator turns the appliance's console stream into the story's progress
// lines: "+12.3s appliance: <message>" for the story's messages and for
// errors, "+1.2s kernel: <line>" for the EFI stub's own lines.
type narrator struct {
	out   io.Writer
	start time.Time
	buf   []byte
}

func (n *narrator) Write(b []byte) (int, error) {
	n.buf = append(n.buf, b...)
	for {
		i := bytes.IndexByte(n.buf, '\n')
		if i < 0 {
			break
		}
		line := string(n.buf[:i])
		n.buf = n.buf[i+1:]
		if s, ok := storyLine(line); ok {
			fmt.Fprintf(n.out, "  +%5.1fs %s\n", time.Since(n.start).Seconds(), s)
		}
	}
	return len(b), nil
}

// storyLine says whether a console line belongs in the story, and how it
// reads there.
func storyLine(line string) (string, bool) {
	if rest, ok := strings.CutPrefix(line, "EFI stub: "); ok {
		return "kernel: " + rest, true
	}
	if !strings.HasPrefix(line, "{") {
		return "", false
	}
	var f map[string]any
	if json.Unmarshal([]byte(line), &f) != nil {
		return "", false
	}
	msg, _ := f["msg"].(string)
	switch {
	case storyMsg(msg):
		return "appliance: " + msg, true
	case f["level"] == "ERROR" && !strings.Contains(msg, "\n"):
		return "appliance: " + msg + attrs(f), true
	}
	return "", false
}

// attrs renders a log line's own fields as " (k=v, ...)".
func attrs(f map[string]any) string {
	var kv []string
	for k, v := range f {
		switch k {
		case "time", "level", "msg":
			continue
		}
		kv = append(kv, fmt.Sprintf("%s=%v", k, v))
	}
	if len(kv) == 0 {
		return ""
	}
	sort.Strings(kv)
	return " (" + strings.Join(kv, ", ") + ")"
}

// summary renders a JSON log line as "message (k=v, ...)".
func summary(line string) string {
	var f map[string]any
	if json.Unmarshal([]byte(line), &f) != nil {
		return line
	}
	msg, _ := f["msg"].(string)
	return msg + attrs(f)
}

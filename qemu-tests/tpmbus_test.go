package qemutests

import (
	"context"
	"encoding/binary"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/qemu-tests/vm"
)

// tpmBusRecord is what crossed one appliance's TPM bus during one boot, as
// the harness's probe between QEMU and swtpm recorded it.
type tpmBusRecord struct {
	toTPM, fromTPM []byte
}

func recordedTPMBus(t testing.TB, v *vm.VM) tpmBusRecord {
	t.Helper()
	to, from, err := v.TPMBus()
	if err != nil {
		t.Fatalf("TPM bus of %s: %v", v.LogPath, err)
	}
	return tpmBusRecord{toTPM: to, fromTPM: from}
}

// TPM 2.0 command codes the bus checks count.
const (
	tpmCCUnseal = 0x15E
)

// commandCounts parses the command stream sent to the TPM (each command a
// 10-byte header of tag, size and code, then its body) and counts each
// command code. A stream that does not parse is an error: the probe must
// have recorded every byte.
func commandCounts(toTPM []byte) (map[uint32]int, error) {
	counts := map[uint32]int{}
	for off := 0; off < len(toTPM); {
		if len(toTPM)-off < 10 {
			return counts, fmt.Errorf("%d stray bytes at offset %d", len(toTPM)-off, off)
		}
		size := int(binary.BigEndian.Uint32(toTPM[off+2:]))
		if size < 10 || size > len(toTPM)-off {
			return counts, fmt.Errorf("command at offset %d has size %d", off, size)
		}
		counts[binary.BigEndian.Uint32(toTPM[off+6:])]++
		off += size
	}
	return counts, nil
}

// unlockReboot is the first reboot of twin-a after provisioning, recorded
// once per test binary for the scenarios about it: its console and its TPM
// bus.
var unlockReboot struct {
	mu    sync.Mutex
	done  bool
	lines []vm.Line
	bus   tpmBusRecord
}

// rebootToUnlock powers a copy of the provisioned twin-a on again, with a
// probe on its TPM bus, and returns what it recorded once the appliance
// served: it attested, got the shares, unlocked both disks with no
// operator action.
func rebootToUnlock(t *testing.T) ([]vm.Line, tpmBusRecord) {
	t.Helper()
	requireE2E(t)
	unlockReboot.mu.Lock()
	defer unlockReboot.mu.Unlock()
	if !unlockReboot.done {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		_, cfg, _ := provisioned(t, "unlock-reboot")
		cfg.RecordTPMBus = true
		v := startVM(t, cfg)
		waitMsg(t, ctx, v, 0, logmsg.MsgServing)
		v.Close()
		unlockReboot.lines = v.Lines()
		unlockReboot.bus = recordedTPMBus(t, v)
		unlockReboot.done = true
	}
	return unlockReboot.lines, unlockReboot.bus
}

// TestBusSnifferSeesNoShare: a probe on the TPM bus (between QEMU and
// swtpm) records twin-a's first boot, which enrolls and provisions its
// disks, and a reboot that unlocks them. Neither recording holds any share
// the brokers received, the passphrase those recombine to, or the volume
// key it opens, in any form, in either direction; and the reboot's
// recording shows the unseals did cross this probe.
func TestBusSnifferSeesNoShare(t *testing.T) {
	at := provisionedEmbassy(t)
	name := twinNames[0]
	lines, reboot := rebootToUnlock(t)
	att, _ := consoleMsg(t, lines, logmsg.MsgAttested)
	shares, _ := att["shares"].(float64)
	if shares < 4 {
		t.Fatalf("the reboot imported %v shares, want 2 disks x k=2", att["shares"])
	}

	counts, err := commandCounts(reboot.toTPM)
	if err != nil {
		t.Fatalf("the recorded command stream: %v", err)
	}
	if counts[tpmCCUnseal] < int(shares) {
		t.Fatalf("the probe saw %d unseals for %v shares: it did not record the unlock", counts[tpmCCUnseal], shares)
	}

	secrets := map[string][]byte{}
	for _, d := range at.secrets[name] {
		secrets["volume key of "+d.uuid] = d.volumeKey
		secrets["passphrase of "+d.uuid] = d.passphrase
		for i, s := range d.shares {
			secrets[fmt.Sprintf("share %d of %s", i, d.uuid)] = s
		}
	}
	for _, rec := range []struct {
		boot string
		bus  tpmBusRecord
	}{{"first boot (provisioning)", at.firstBoot.tpmBus[name]}, {"reboot (unlock)", reboot}} {
		if len(rec.bus.toTPM) == 0 || len(rec.bus.fromTPM) == 0 {
			t.Fatalf("%s: nothing recorded", rec.boot)
		}
		for dir, b := range map[string][]byte{"to the TPM": rec.bus.toTPM, "from the TPM": rec.bus.fromTPM} {
			if found := findSecrets(b, secrets); len(found) > 0 {
				t.Errorf("%s, %s: the bus carried %v", rec.boot, dir, found)
			}
		}
		t.Logf("%s: %d bytes to the TPM, %d from it", rec.boot, len(rec.bus.toTPM), len(rec.bus.fromTPM))
	}
}

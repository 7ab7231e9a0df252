package eventlog

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"slices"
	"testing"

	"github.com/dataembassy/embassy/images/manifest"
	"github.com/dataembassy/embassy/tpm/pcrs"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// The image the structured logs are checked against.
var (
	fuzzUKI         = sha256.Sum256([]byte("UKI, Authenticode"))
	fuzzSecureBoot  = sha256.Sum256([]byte("SecureBoot=1 PK KEK db dbx"))
	fuzzAuthority   = sha256.Sum256([]byte("db certificate"))
	fuzzSection     = sha256.Sum256([]byte(".linux"))
	fuzzLoadOptions = sha256.Sum256([]byte("command line"))
	fuzzInitrd      = sha256.Sum256([]byte("initrd"))
	fuzzPCR11       = sha256.Sum256(append(make([]byte, 32), fuzzSection[:]...))
	fuzzImage       = manifest.Measurements{UKIAuthenticode: hex.EncodeToString(fuzzUKI[:]),
		SecureBoot:  []string{hex.EncodeToString(fuzzSecureBoot[:]), hex.EncodeToString(separator[:]), hex.EncodeToString(fuzzAuthority[:])},
		LoadOptions: hex.EncodeToString(fuzzLoadOptions[:]), Initrd: hex.EncodeToString(fuzzInitrd[:]),
		UKISections: hex.EncodeToString(fuzzPCR11[:])}
)

// The events go-attestation adds to PCR5 when it does not replay
// (firmware that forgets to log Exit Boot Services).
const (
	ebsInvocation = "Exit Boot Services Invocation"
	ebsSuccess    = "Exit Boot Services Returned with Success"
	ebsFailure    = "Exit Boot Services Returned with Failure"
)

// How an event of a structured log is digested (the high nibble of its
// first byte).
const (
	digestUKI = iota
	digestSecureBoot
	digestLoadOptions
	digestInitrd
	digestCallingBootOption
	digestReturningBootOption
	digestSeparator
	digestNoAction        // EV_NO_ACTION: logged, not extended
	digestNone            // no SHA-256 digest at all
	digestStartupLocality // EV_NO_ACTION StartupLocality, the data's first byte is the locality
	digestAuthority
	digestSection
	// anything above: the SHA-256 of the event data
)

// fuzzPCRs are the PCRs events land in (the low nibble of their first
// byte): mostly those the manifest check reads (4, 7, 9, 11) or requires
// empty (8, 12).
var fuzzPCRs = [16]int{4, 4, 4, 9, 9, 9, 7, 7, 11, 11, 0, 1, 5, 8, 12, 17}

// fuzzTypes are the event types (low 3 bits of the second byte); only
// EV_NO_ACTION changes what is extended.
var fuzzTypes = [8]uint32{tpmtest.EvEFIAction, tpmtest.EvSeparator, tpmtest.EvEventTag, tpmtest.EvEFIBootServicesApp,
	0x00000001, 0x0000000d, 0x80000001, 0x800000e0}

type fuzzEvent struct {
	pcr    int
	typ    uint32
	digest []byte // nil: no SHA-256 digest
	data   []byte
}

// decodeEvents turns fuzz input into events: per event, a byte of digest
// kind and PCR, a byte of type and data length, then the data.
func decodeEvents(prog []byte) []fuzzEvent {
	var out []fuzzEvent
	for len(prog) >= 2 && len(out) < 64 {
		kind, pcr := prog[0]>>4, fuzzPCRs[prog[0]&0x0f]
		typ, n := fuzzTypes[prog[1]&7], min(int(prog[1]>>3), len(prog)-2)
		data := append([]byte(nil), prog[2:2+n]...)
		prog = prog[2+n:]
		e := fuzzEvent{pcr: pcr, typ: typ, data: data}
		switch kind {
		case digestUKI:
			e.digest = fuzzUKI[:]
		case digestSecureBoot:
			e.digest = fuzzSecureBoot[:]
		case digestAuthority:
			e.digest = fuzzAuthority[:]
		case digestSection:
			e.digest = fuzzSection[:]
		case digestLoadOptions:
			e.digest = fuzzLoadOptions[:]
		case digestInitrd:
			e.digest = fuzzInitrd[:]
		case digestCallingBootOption:
			e.digest = callingBootOption[:]
		case digestReturningBootOption:
			e.digest = returningBootOpt[:]
		case digestSeparator:
			e.digest = separator[:]
		case digestNoAction:
			e.typ, e.digest = tpmtest.EvNoAction, make([]byte, sha256.Size)
		case digestNone:
		case digestStartupLocality:
			e.typ, e.digest = tpmtest.EvNoAction, make([]byte, sha256.Size)
			e.data = append([]byte("StartupLocality\x00"), append(data, 0)[0])
		default:
			d := sha256.Sum256(data)
			e.digest = d[:]
		}
		out = append(out, e)
	}
	return out
}

// serialise writes a TCG2 crypto-agile log of the events (SHA-256 bank).
func serialise(events []fuzzEvent) []byte {
	var b bytes.Buffer
	b.Write(tpmtest.NewEventLog().Bytes())
	le := func(v any) { binary.Write(&b, binary.LittleEndian, v) }
	for _, e := range events {
		le(uint32(e.pcr))
		le(e.typ)
		if e.digest == nil {
			le(uint32(0))
		} else {
			le(uint32(1))
			le(uint16(0x000b))
			b.Write(e.digest)
		}
		le(uint32(len(e.data)))
		b.Write(e.data)
	}
	return b.Bytes()
}

// replayModel extends each event of pcr the way a TPM does (EV_NO_ACTION
// is not extended; a StartupLocality event before the first extension of
// PCR0 sets its initial value), plus extra digests. It reports whether the
// PCR has an extended event and whether every one had a SHA-256 digest.
func replayModel(events []fuzzEvent, pcr int, extra ...[]byte) (value []byte, extended, complete bool) {
	var locality byte
	value = make([]byte, sha256.Size)
	complete = true
	extend := func(d []byte) {
		if !extended {
			value[sha256.Size-1] = locality
		}
		s := sha256.Sum256(append(value, d...))
		value, extended = s[:], true
	}
	for _, e := range events {
		if e.pcr != pcr {
			continue
		}
		if e.typ == tpmtest.EvNoAction {
			if pcr == 0 && len(e.data) == 17 && bytes.HasPrefix(e.data, []byte("StartupLocality")) {
				locality = e.data[16]
			}
			continue
		}
		if e.digest == nil {
			complete = false
			continue
		}
		extend(e.digest)
	}
	for _, d := range extra {
		extend(d)
	}
	if !extended {
		value = make([]byte, sha256.Size)
	}
	return value, extended, complete
}

// FuzzCheckBoot builds well-formed event logs from structured input
// (events of the image's kernel, command line and initrd, of the
// firmware's boot-option action and separator, of arbitrary data, without
// a digest, EV_NO_ACTION and StartupLocality, in any PCR and order) with
// the PCR values a TPM would hold after them, one of them changed for
// about a third of the inputs, so that most inputs get through the parser
// and the replay to the comparison with the manifest, as the broker runs
// them (Replay, then CheckBoot). It proves, against a model written here,
// that Replay accepts exactly the logs that replay to the quoted PCRs and
// returns their events in order, and that a boot is accepted only when
// PCR4 holds one of the manifest's kernels once and otherwise only the
// boot-option action and separator, and PCR9 exactly its command line and
// initrd.
func FuzzCheckBoot(f *testing.F) {
	ev := func(kind, pcrSlot byte, data string) []byte {
		return append([]byte{kind<<4 | pcrSlot, byte(len(data)) << 3}, data...)
	}
	boot := bytes.Join([][]byte{
		ev(digestSecureBoot, 6, "SecureBoot"),
		ev(digestSeparator, 6, "\x00\x00\x00\x00"),
		ev(digestCallingBootOption, 0, "Calling EFI Application from Boot Option"[:31]),
		ev(digestSeparator, 0, "\x00\x00\x00\x00"),
		ev(digestAuthority, 7, "db"),
		ev(digestUKI, 0, ""),
		ev(digestSection, 8, ".linux"),
		ev(digestLoadOptions, 3, "LOADED_IMAGE::LoadOptions\x00"),
		ev(digestInitrd, 3, "Linux initrd\x00"),
	}, nil)
	firmware := bytes.Join([][]byte{ev(digestStartupLocality, 6, "\x03"), ev(15, 6, "firmware"), ev(15, 7, "config"), ev(digestNoAction, 8, "")}, nil)
	f.Add(boot, uint8(0xff))
	f.Add(append(append([]byte(nil), firmware...), boot...), uint8(0xff))
	f.Add(append(append([]byte(nil), boot...), ev(digestSection, 9, ".linux")...), uint8(0xff))
	f.Add(append(append([]byte(nil), boot...), ev(15, 14, "override")...), uint8(0xff))
	f.Add(boot, uint8(4))
	f.Add(append(append([]byte(nil), boot...), ev(digestUKI, 0, "")...), uint8(0xff))
	f.Add(append(append([]byte(nil), boot...), ev(digestAuthority, 7, "db")...), uint8(0xff))
	f.Add(append(append([]byte(nil), boot...), ev(15, 3, "module")...), uint8(0xff))
	f.Add(append(append([]byte(nil), boot...), ev(digestNone, 1, "")...), uint8(0xff))
	f.Fuzz(func(t *testing.T, prog []byte, tamper uint8) {
		events := decodeEvents(prog)
		raw := serialise(events)
		quoted := map[int][]byte{}
		for _, i := range pcrs.Indexes() {
			quoted[i], _, _ = replayModel(events, i)
		}
		if i := int(tamper % 32); quoted[i] != nil {
			quoted[i] = append([]byte(nil), quoted[i]...)
			quoted[i][int(tamper)%sha256.Size] ^= 1 << (tamper % 8)
		}

		// The model: every quoted PCR replays (PCR5 also with go-attestation's
		// Exit Boot Services workarounds), and which events it verifies.
		wantReplay := true
		for i, v := range quoted {
			got, extended, complete := replayModel(events, i)
			ok := complete && bytes.Equal(got, v)
			if i == 5 && extended && !ok {
				for _, inj := range [][]string{{ebsInvocation, ebsSuccess}, {ebsInvocation, ebsFailure}, {ebsInvocation, ebsFailure, ebsSuccess}} {
					var ds [][]byte
					for _, s := range inj {
						d := sha256.Sum256([]byte(s))
						ds = append(ds, d[:])
					}
					got, _, complete := replayModel(events, i, ds...)
					ok = ok || complete && bytes.Equal(got, v)
				}
			}
			wantReplay = wantReplay && ok
		}

		verified, err := Replay(raw, quoted)
		if (err == nil) != wantReplay {
			t.Fatalf("Replay = %v, the model says replays: %v", err, wantReplay)
		}
		if err != nil {
			return
		}
		var want []Event
		var k4, other4, other9, lo, in, n11, in8or12 int
		var pcr7 []string
		for _, e := range events {
			if quoted[e.pcr] == nil || e.typ == tpmtest.EvNoAction {
				continue
			}
			d := hex.EncodeToString(e.digest)
			want = append(want, Event{PCR: e.pcr, Digest: d})
			switch {
			case e.pcr == 7:
				pcr7 = append(pcr7, d)
			case e.pcr == 11:
				n11++
			case e.pcr == 8 || e.pcr == 12:
				in8or12++
			case e.pcr == 4 && d == fuzzImage.UKIAuthenticode:
				k4++
			case e.pcr == 4 && d != hex.EncodeToString(callingBootOption[:]) && d != hex.EncodeToString(returningBootOpt[:]) && d != hex.EncodeToString(separator[:]):
				other4++
			case e.pcr == 9 && d == fuzzImage.LoadOptions:
				lo++
			case e.pcr == 9 && d == fuzzImage.Initrd:
				in++
			case e.pcr == 9:
				other9++
			}
		}
		if len(verified) < len(want) {
			t.Fatalf("Replay verified %d events, the log has %d", len(verified), len(want))
		}
		for i, w := range want {
			if verified[i].PCR != w.PCR || verified[i].Digest != w.Digest {
				t.Fatalf("event %d verified as PCR%d %s, logged as PCR%d %s", i, verified[i].PCR, verified[i].Digest, w.PCR, w.Digest)
			}
		}
		for _, e := range verified[len(want):] { // what a workaround added
			if e.PCR != 5 {
				t.Fatalf("Replay verified an event the log does not have: %+v", e)
			}
		}
		pcr11, _, _ := replayModel(events, 11)
		wantOK := k4 == 1 && other4 == 0 && lo == 1 && in == 1 && other9 == 0 && slices.Equal(pcr7, fuzzImage.SecureBoot) &&
			n11 > 0 && hex.EncodeToString(pcr11) == fuzzImage.UKISections && in8or12 == 0
		if c := CheckBoot(verified, fuzzImage); c.OK() != wantOK {
			t.Fatalf("CheckBoot OK = %v, the model says %v: %+v", c.OK(), wantOK, c)
		}
	})
}

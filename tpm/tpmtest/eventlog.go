package tpmtest

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"io"
	"testing"

	"github.com/google/go-tpm/legacy/tpm2"

	"github.com/dataembassy/embassy/images/manifest"
)

// Event types used by the firmware and the Linux EFI stub.
const (
	EvIPL                             = 0x0000000d
	EvNoAction                        = 0x00000003
	EvSeparator                       = 0x00000004
	EvEventTag                        = 0x00000006
	EvSCRTMVersion                    = 0x00000008
	EvEFIVariableDriverConfig         = 0x80000001
	EvEFIVariableBoot                 = 0x80000002
	EvEFIBootServicesApp              = 0x80000003
	EvEFIGPTEvent                     = 0x80000006
	EvEFIAction                       = 0x80000007
	EvEFIPlatformFirmwareBlob2        = 0x8000000a
	EvEFIVariableAuthority            = 0x800000e0
	algSHA256                  uint16 = 0x000b
)

// EventLog builds a TCG2 crypto-agile event log (SHA-256 bank only) and
// extends the same digests into a TPM, the way firmware does.
type EventLog struct {
	buf bytes.Buffer
}

// NewEventLog starts a log with the Spec ID event.
func NewEventLog() *EventLog {
	l := &EventLog{}
	var spec bytes.Buffer
	spec.WriteString("Spec ID Event03\x00")
	binary.Write(&spec, binary.LittleEndian, uint32(0)) // platform class
	spec.Write([]byte{0, 2, 0, 2})                      // minor, major, errata, uintn size
	binary.Write(&spec, binary.LittleEndian, uint32(1)) // one algorithm
	binary.Write(&spec, binary.LittleEndian, algSHA256)
	binary.Write(&spec, binary.LittleEndian, uint16(32))
	spec.WriteByte(0) // vendor info size
	binary.Write(&l.buf, binary.LittleEndian, uint32(0))
	binary.Write(&l.buf, binary.LittleEndian, uint32(EvNoAction))
	l.buf.Write(make([]byte, 20))
	binary.Write(&l.buf, binary.LittleEndian, uint32(spec.Len()))
	l.buf.Write(spec.Bytes())
	return l
}

// Add appends an event with an explicit digest.
func (l *EventLog) Add(pcr int, typ uint32, digest []byte, data []byte) {
	binary.Write(&l.buf, binary.LittleEndian, uint32(pcr))
	binary.Write(&l.buf, binary.LittleEndian, typ)
	binary.Write(&l.buf, binary.LittleEndian, uint32(1))
	binary.Write(&l.buf, binary.LittleEndian, algSHA256)
	l.buf.Write(digest)
	binary.Write(&l.buf, binary.LittleEndian, uint32(len(data)))
	l.buf.Write(data)
}

// Bytes returns the log.
func (l *EventLog) Bytes() []byte { return append([]byte(nil), l.buf.Bytes()...) }

// Measure logs an event and extends its digest into the TPM.
func (l *EventLog) Measure(t testing.TB, rw io.ReadWriter, pcr int, typ uint32, digest []byte, data []byte) {
	t.Helper()
	l.Add(pcr, typ, digest, data)
	if err := tpm2.PCRExtend(rw, tpmutilHandle(pcr), tpm2.AlgSHA256, digest, ""); err != nil {
		t.Fatalf("extend PCR %d: %v", pcr, err)
	}
}

// BootDigests are the measurements of an appliance image booted under
// Secure Boot: the signed UKI (PCR4), the Secure Boot variables and the
// authority that verified the UKI (PCR7), the command line and initrd
// (PCR9) and the UKI's sections (PCR11).
type BootDigests struct {
	UKI, LoadOptions, Initrd []byte
	SecureBoot, Authority    []byte
	Sections                 [][]byte
}

// NewBootDigests derives distinct digests for an image called name; the
// Secure Boot events are the same for every image (one home state's keys).
func NewBootDigests(name string) BootDigests {
	h := func(s string) []byte { d := sha256.Sum256([]byte(s)); return d[:] }
	return BootDigests{UKI: h(name + " uki"), LoadOptions: h(name + " cmdline"), Initrd: h(name + " initrd"),
		SecureBoot: h("SecureBoot=1 PK KEK db dbx"), Authority: h("db certificate"),
		Sections: [][]byte{h(".linux"), h(name + " kernel"), h(".initrd"), h(name + " initrd")}}
}

// Measurements are the manifest measurements of the image d.
func (d BootDigests) Measurements() manifest.Measurements {
	sep := sha256.Sum256([]byte{0, 0, 0, 0})
	var pcr11 [32]byte
	for _, s := range d.Sections {
		pcr11 = sha256.Sum256(append(pcr11[:], s...))
	}
	return manifest.Measurements{
		UKIAuthenticode: hex.EncodeToString(d.UKI),
		SecureBoot:      []string{hex.EncodeToString(d.SecureBoot), hex.EncodeToString(sep[:]), hex.EncodeToString(d.Authority)},
		LoadOptions:     hex.EncodeToString(d.LoadOptions),
		Initrd:          hex.EncodeToString(d.Initrd),
		UKISections:     hex.EncodeToString(pcr11[:]),
	}
}

// MeasuredBoot plays a firmware + EFI stub boot of an image into the TPM
// and returns the event log: the kernel in PCR4 with the boot-option action
// and separator, the command line and initrd in PCR9. The platform PCRs
// keep their reset values (see FirmwareBoot for a platform that measures
// itself).
func MeasuredBoot(t testing.TB, rw io.ReadWriter, d BootDigests) []byte {
	t.Helper()
	l := NewEventLog()
	l.MeasureBoot(t, rw, d)
	return l.Bytes()
}

// FirmwareBoot plays a platform's own measurements (fw) and then the boot
// of image d into the TPM, and returns the event log.
func FirmwareBoot(t testing.TB, rw io.ReadWriter, fw Firmware, d BootDigests) []byte {
	t.Helper()
	l := NewEventLog()
	l.MeasureFirmware(t, rw, fw)
	l.MeasureBoot(t, rw, d)
	return l.Bytes()
}

// Firmware is what a simulated platform measures before it calls the boot
// loader: the CRTM version and firmware volumes (PCR0), the boot variables
// (PCR1) and the GPT (PCR5). Each field is the data measured; its digest is
// SHA-256 of it. The Secure Boot policy (PCR7) is the image's
// (BootDigests), as the manifest predicts it.
type Firmware struct {
	CRTMVersion string
	Blobs       []string // firmware volumes, in measurement order
	BootOrder   string
	GPT         string
}

// NewFirmware makes a platform whose measurements derive from name.
func NewFirmware(name string) Firmware {
	return Firmware{CRTMVersion: name + " CRTM 1.0", Blobs: []string{name + " PEI volume", name + " DXE volume", name + " NVRAM volume"},
		BootOrder: name + " BootOrder 0001", GPT: name + " GPT"}
}

// MeasureFirmware logs fw's events into PCRs 0, 1 and 5 and extends them,
// then a separator into each of PCRs 0-3, 5 and 6 (PCR4's and PCR7's are
// MeasureBoot's).
func (l *EventLog) MeasureFirmware(t testing.TB, rw io.ReadWriter, fw Firmware) {
	t.Helper()
	measure := func(pcr int, typ uint32, data string) {
		d := sha256.Sum256([]byte(data))
		l.Measure(t, rw, pcr, typ, d[:], []byte(data))
	}
	measure(0, EvSCRTMVersion, fw.CRTMVersion)
	for _, b := range fw.Blobs {
		measure(0, EvEFIPlatformFirmwareBlob2, b)
	}
	measure(1, EvEFIVariableBoot, fw.BootOrder)
	sep := sha256.Sum256([]byte{0, 0, 0, 0})
	for _, pcr := range []int{0, 1, 2, 3, 5, 6} {
		l.Measure(t, rw, pcr, EvSeparator, sep[:], []byte{0, 0, 0, 0})
	}
	measure(5, EvEFIGPTEvent, fw.GPT)
}

// MeasureBoot logs and extends the boot of image d under Secure Boot: the
// Secure Boot variables and separator in PCR7, the UKI in PCR4 with the
// boot-option action and separator, the authority that verified it in
// PCR7, its sections in PCR11, the command line and initrd in PCR9.
func (l *EventLog) MeasureBoot(t testing.TB, rw io.ReadWriter, d BootDigests) {
	t.Helper()
	action := []byte("Calling EFI Application from Boot Option")
	ad := sha256.Sum256(action)
	sep := sha256.Sum256([]byte{0, 0, 0, 0})
	l.Measure(t, rw, 7, EvEFIVariableDriverConfig, d.SecureBoot, []byte("SecureBoot"))
	l.Measure(t, rw, 7, EvSeparator, sep[:], []byte{0, 0, 0, 0})
	l.Measure(t, rw, 4, EvEFIAction, ad[:], action)
	l.Measure(t, rw, 4, EvSeparator, sep[:], []byte{0, 0, 0, 0})
	l.Measure(t, rw, 7, EvEFIVariableAuthority, d.Authority, []byte("db"))
	l.Measure(t, rw, 4, EvEFIBootServicesApp, d.UKI, make([]byte, 40))
	for _, s := range d.Sections {
		l.Measure(t, rw, 11, EvIPL, s, []byte("section"))
	}
	l.Measure(t, rw, 9, EvEventTag, d.LoadOptions, []byte("LOADED_IMAGE::LoadOptions\x00"))
	l.Measure(t, rw, 9, EvEventTag, d.Initrd, []byte("Linux initrd\x00"))
}

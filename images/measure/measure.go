// Package measure predicts the measured-boot event digests of an image
// booted by UEFI firmware with the Linux EFI stub: the kernel's Authenticode
// digest in PCR4 and the two PCR9 events the stub logs for the command line
// and the initrd.
package measure

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"unicode/utf16"

	"github.com/dataembassy/embassy/images/authenticode"
)

// Event descriptions the Linux EFI stub puts in its PCR9 tagged events.
const (
	LoadOptionsEvent = "LOADED_IMAGE::LoadOptions"
	InitrdEvent      = "Linux initrd"
)

// FirmwareInitrdSuffix is what OVMF's direct kernel boot (QEMU -kernel/
// -initrd) appends to the command line it hands the kernel as LoadOptions, so
// that the stub loads the initrd from the firmware's kernel file system.
const FirmwareInitrdSuffix = " initrd=initrd"

// Kernel returns the PCR4 digest of a kernel image.
func Kernel(vmlinuz []byte) ([32]byte, error) {
	d, err := authenticode.SHA256(vmlinuz)
	if err != nil {
		return d, fmt.Errorf("kernel Authenticode digest: %w", err)
	}
	return d, nil
}

// LoadOptions returns the bytes the EFI stub measures for a command line:
// the UEFI LoadOptions, a NUL-terminated UTF-16LE string.
func LoadOptions(cmdline string) []byte {
	units := utf16.Encode([]rune(cmdline + FirmwareInitrdSuffix))
	out := make([]byte, 0, 2*len(units)+2)
	for _, u := range units {
		out = binary.LittleEndian.AppendUint16(out, u)
	}
	return append(out, 0, 0)
}

// Cmdline returns the PCR9 LoadOptions event digest for a command line.
func Cmdline(cmdline string) [32]byte {
	return sha256.Sum256(LoadOptions(cmdline))
}

// Initrd returns the PCR9 initrd event digest: the hash of the initrd file
// exactly as the firmware hands it to the stub.
func Initrd(initrd []byte) [32]byte {
	return sha256.Sum256(initrd)
}

// QEMU direct kernel boot (-kernel) does not hand the firmware the kernel
// file unchanged: QEMU (7.2, as in Debian 12) fills in the x86 boot-protocol
// fields of the setup header (loader type, heap end, command-line pointer,
// initrd address and size) before OVMF loads and measures the image. The
// digest in PCR4 is then the Authenticode digest of that patched image. The
// patched fields are loader data, not code; their values depend only on the
// guest's memory size and the initrd's size, so mkimage can predict them.
const (
	qemuRealAddr     = 0x10000
	qemuCmdlineAddr  = 0x20000
	qemuACPIDataSize = 0x20000 + 0x8000
	qemuLoaderType   = 0xB0
	hdrMagic         = 0x53726448 // "HdrS"
	canUseHeap       = 0x80
	loadedHigh       = 0x01
)

// MaxQEMUMemoryMiB is the largest guest memory for which QEMUDirectKernel
// knows the q35 memory layout (all RAM below 4 GiB).
const MaxQEMUMemoryMiB = 2048

// QEMUDirectKernel returns the PCR4 digest of vmlinuz booted by QEMU's q35
// machine with -kernel/-initrd, memMiB of RAM and an initrd of initrdSize
// bytes.
func QEMUDirectKernel(vmlinuz []byte, initrdSize int, memMiB int) ([32]byte, error) {
	var zero [32]byte
	if memMiB < 128 || memMiB > MaxQEMUMemoryMiB {
		return zero, fmt.Errorf("QEMU memory %d MiB outside the supported 128..%d", memMiB, MaxQEMUMemoryMiB)
	}
	if len(vmlinuz) < 0x260 || binary.LittleEndian.Uint32(vmlinuz[0x202:]) != hdrMagic {
		return zero, fmt.Errorf("kernel has no x86 boot-protocol header")
	}
	protocol := binary.LittleEndian.Uint16(vmlinuz[0x206:])
	if protocol < 0x203 || vmlinuz[0x211]&loadedHigh == 0 {
		return zero, fmt.Errorf("kernel boot protocol %#x is older than the 2.03 this prediction covers", protocol)
	}
	if initrdSize <= 0 || initrdSize >= memMiB<<20 {
		return zero, fmt.Errorf("initrd size %d does not fit %d MiB", initrdSize, memMiB)
	}
	p := append([]byte(nil), vmlinuz...)
	p[0x210] = qemuLoaderType
	p[0x211] |= canUseHeap
	binary.LittleEndian.PutUint16(p[0x224:], qemuCmdlineAddr-qemuRealAddr-0x200)
	binary.LittleEndian.PutUint32(p[0x228:], qemuCmdlineAddr)
	initrdMax := uint64(binary.LittleEndian.Uint32(p[0x22c:]))
	below4G := uint64(memMiB) << 20
	if initrdMax >= below4G-qemuACPIDataSize {
		initrdMax = below4G - qemuACPIDataSize - 1
	}
	binary.LittleEndian.PutUint32(p[0x218:], uint32((initrdMax-uint64(initrdSize))&^4095))
	binary.LittleEndian.PutUint32(p[0x21c:], uint32(initrdSize))
	return Kernel(p)
}

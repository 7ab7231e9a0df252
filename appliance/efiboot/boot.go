package efiboot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"strings"

	"github.com/dataembassy/embassy/images/diskimage"
)

// Names of the boot manager's variables (§3.3).
const (
	bootOrderName   = "BootOrder"
	bootNextName    = "BootNext"
	bootCurrentName = "BootCurrent"
)

// ErrNoFreeEntry is returned when every Boot#### number either exists or is
// listed in BootOrder. With BootOrder limited to MaxDataSize and the
// directory listing to 4096 entries this cannot happen; it stays as a guard.
var ErrNoFreeEntry = errors.New("no free Boot#### number outside BootOrder")

// BootName returns the variable name of boot entry num: Boot and four
// upper-case hex digits (§3.3).
func BootName(num uint16) string { return fmt.Sprintf("Boot%04X", num) }

// parseBootName returns the number of a Boot#### name; only the upper-case
// hex form the specification defines counts.
func parseBootName(name string) (uint16, bool) {
	if len(name) != 8 || !strings.HasPrefix(name, "Boot") {
		return 0, false
	}
	var n uint16
	for i := 4; i < 8; i++ {
		c := name[i]
		var d byte
		switch {
		case c >= '0' && c <= '9':
			d = c - '0'
		case c >= 'A' && c <= 'F':
			d = c - 'A' + 10
		default:
			return 0, false
		}
		n = n<<4 | uint16(d)
	}
	return n, true
}

func listed(order []uint16, num uint16) bool {
	for _, o := range order {
		if o == num {
			return true
		}
	}
	return false
}

// BootEntryFor returns the boot entry of a slot partition on the boot
// disk: active, described by the partition's GPT name, with the device path
// HD(number,GPT,guid,start,size)/File(\EFI\BOOT\BOOTX64.EFI) and no optional
// data. Start and size are in the disk's logical blocks, which for
// embassy.img are its 512-byte sectors.
func BootEntryFor(p diskimage.Partition) (LoadOption, error) {
	switch {
	case p.Number < 1 || p.Number > diskimage.EntryCount:
		return LoadOption{}, fmt.Errorf("%w: partition number %d, want 1-%d", ErrLoadOption, p.Number, diskimage.EntryCount)
	case p.GUID == (GUID{}):
		return LoadOption{}, fmt.Errorf("%w: partition %d has no unique GUID", ErrLoadOption, p.Number)
	case p.LastLBA < p.FirstLBA:
		return LoadOption{}, fmt.Errorf("%w: partition %d ends (LBA %d) before it starts (LBA %d)", ErrLoadOption, p.Number, p.LastLBA, p.FirstLBA)
	case p.Name == "":
		return LoadOption{}, fmt.Errorf("%w: partition %d has no name for the description", ErrLoadOption, p.Number)
	}
	file, err := FileNode(strings.ReplaceAll(diskimage.BootPath, "/", `\`))
	if err != nil {
		return LoadOption{}, err
	}
	o := LoadOption{
		Attributes:  LoadOptionActive,
		Description: p.Name,
		FilePath: []Node{
			HardDrive{
				PartitionNumber: uint32(p.Number),
				PartitionStart:  p.FirstLBA,
				PartitionSize:   p.LastLBA - p.FirstLBA + 1,
				PartitionGUID:   p.GUID,
			}.Node(),
			file,
		},
	}
	if _, err := o.Encode(); err != nil {
		return LoadOption{}, fmt.Errorf("partition %d: %w", p.Number, err)
	}
	return o, nil
}

// BootOrder returns the boot numbers BootOrder lists, in order; no
// BootOrder is an empty list. A BootOrder of odd length is ErrVariable.
func (v *Vars) BootOrder() ([]uint16, error) {
	vr, err := v.Read(bootOrderName, GlobalVariable)
	if errors.Is(err, ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if len(vr.Data)%2 != 0 {
		return nil, fmt.Errorf("%w: BootOrder has %d bytes, not a list of 16-bit numbers", ErrVariable, len(vr.Data))
	}
	order := make([]uint16, len(vr.Data)/2)
	for i := range order {
		order[i] = binary.LittleEndian.Uint16(vr.Data[2*i:])
	}
	return order, nil
}

// BootEntry reads and decodes Boot####.
func (v *Vars) BootEntry(num uint16) (LoadOption, error) {
	name := BootName(num)
	vr, err := v.Read(name, GlobalVariable)
	if err != nil {
		return LoadOption{}, err
	}
	o, err := DecodeLoadOption(vr.Data)
	if err != nil {
		return LoadOption{}, fmt.Errorf("%s: %w", name, err)
	}
	return o, nil
}

// EnsureBootEntry returns the number of a Boot#### entry holding exactly
// opt: an existing one that BootOrder does not list, or else a new one at
// the lowest number that neither exists nor is listed in BootOrder (a
// listed number without a variable is left alone: creating it would change
// what the firmware measures into PCR1). BootOrder and the entries it lists
// are never written. Existing entries that cannot be read as variables are
// skipped, never overwritten.
func EnsureBootEntry(v *Vars, opt LoadOption) (uint16, error) {
	want, err := opt.Encode()
	if err != nil {
		return 0, err
	}
	order, err := v.BootOrder()
	if err != nil {
		return 0, fmt.Errorf("boot entry: %w", err)
	}
	names, err := v.names(GlobalVariable)
	if err != nil {
		return 0, err
	}
	exists := make(map[uint16]bool)
	for _, name := range names {
		num, ok := parseBootName(name)
		if !ok {
			continue
		}
		exists[num] = true
		if listed(order, num) {
			continue
		}
		vr, err := v.Read(name, GlobalVariable)
		switch {
		case errors.Is(err, ErrVariable), errors.Is(err, ErrNotFound):
			continue
		case err != nil:
			return 0, fmt.Errorf("boot entry: %w", err)
		}
		if bytes.Equal(vr.Data, want) {
			return num, nil
		}
	}
	for n := 0; n <= 0xFFFF; n++ {
		num := uint16(n)
		if exists[num] || listed(order, num) {
			continue
		}
		err := v.create(BootName(num), GlobalVariable, want)
		if errors.Is(err, fs.ErrExist) {
			// Created since the listing; leave it to whoever did.
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("boot entry: %w", err)
		}
		return num, nil
	}
	return 0, ErrNoFreeEntry
}

// SetBootNext makes Boot#### the firmware's choice for the next boot only
// (BootNext, §3.1.2). The entry must exist, be a valid load option and not
// be listed in BootOrder (ErrListed): the entries this package creates
// never are, and pointing BootNext at a listed one would boot something
// the upgrade did not write.
func SetBootNext(v *Vars, num uint16) error {
	if _, err := v.BootEntry(num); err != nil {
		return fmt.Errorf("BootNext: %w", err)
	}
	if err := v.guard(BootName(num), GlobalVariable); err != nil {
		return fmt.Errorf("BootNext: %w", err)
	}
	return v.Write(bootNextName, GlobalVariable, binary.LittleEndian.AppendUint16(nil, num))
}

// BootNext returns the number BootNext holds, and false if there is none.
func BootNext(v *Vars) (uint16, bool, error) {
	num, err := readBootNumber(v, bootNextName)
	if errors.Is(err, ErrNotFound) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	return num, true, nil
}

// ClearBootNext deletes BootNext; none is not an error. The firmware
// deletes it itself when it boots it, so this only withdraws a BootNext
// set before a reboot that did not happen.
func ClearBootNext(v *Vars) error {
	err := v.Delete(bootNextName, GlobalVariable)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	return err
}

// BootCurrent returns the number of the boot entry the firmware booted
// (BootCurrent, a volatile variable the firmware sets at every boot).
func BootCurrent(v *Vars) (uint16, error) {
	return readBootNumber(v, bootCurrentName)
}

func readBootNumber(v *Vars, name string) (uint16, error) {
	vr, err := v.Read(name, GlobalVariable)
	if err != nil {
		return 0, err
	}
	if len(vr.Data) != 2 {
		return 0, fmt.Errorf("%w: %s has %d bytes, want 2", ErrVariable, name, len(vr.Data))
	}
	return binary.LittleEndian.Uint16(vr.Data), nil
}

package efiboot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/dataembassy/embassy/images/ovmfvars"
)

// DefaultDir is where Linux mounts efivarfs.
const DefaultDir = "/sys/firmware/efi/efivars"

// GlobalVariable is EFI_GLOBAL_VARIABLE, the vendor GUID of Boot####,
// BootOrder, BootNext and BootCurrent (§3.3).
var GlobalVariable = ovmfvars.GlobalVariable

// Variable attributes (§8.2).
const (
	AttrNonVolatile                       uint32 = 0x00000001
	AttrBootserviceAccess                 uint32 = 0x00000002
	AttrRuntimeAccess                     uint32 = 0x00000004
	AttrHardwareErrorRecord               uint32 = 0x00000008
	AttrAuthenticatedWriteAccess          uint32 = 0x00000010
	AttrTimeBasedAuthenticatedWriteAccess uint32 = 0x00000020
	AttrAppendWrite                       uint32 = 0x00000040
	AttrEnhancedAuthenticatedAccess       uint32 = 0x00000080

	// AttrNVBSRT are the attributes of every variable this package writes
	// (those of Boot#### and BootNext, §3.3).
	AttrNVBSRT = AttrNonVolatile | AttrBootserviceAccess | AttrRuntimeAccess

	attrKnown = 0x000000FF
)

// MaxDataSize is the most data a variable may hold for Read to accept it.
// Boot entries and the boot variables are tens of bytes; 8 KiB is OVMF's
// whole per-variable limit.
const MaxDataSize = 8 << 10

// maxDirEntries bounds a listing of the efivarfs directory; firmware keeps
// a few hundred variables at most.
const maxDirEntries = 4096

var (
	// ErrNotFound is returned (wrapped) when a variable does not exist.
	ErrNotFound = errors.New("EFI variable not found")
	// ErrVariable is returned (wrapped) for a variable file that is not a
	// valid efivarfs variable: shorter than the attributes, larger than
	// MaxDataSize, or with unknown attribute bits; and for variables whose
	// data is not what its name requires (BootOrder of odd length, ...).
	ErrVariable = errors.New("invalid EFI variable")
	// ErrName is returned for a variable name this package does not use.
	ErrName = errors.New("invalid EFI variable name")
	// ErrListed is returned for any attempt to write or delete BootOrder or
	// a Boot#### entry BootOrder lists, or to point BootNext at one: the
	// firmware measures those into PCR1.
	ErrListed = errors.New("refusing to touch BootOrder or a boot entry it lists")
)

// Variable is a UEFI variable as efivarfs shows it.
type Variable struct {
	Attributes uint32
	Data       []byte
}

// Vars reads and writes UEFI variables through an efivarfs directory.
type Vars struct {
	dir string
}

// Open returns access to the variables under dir, which must be a
// directory: DefaultDir on the appliance (efivarfs mounted there), a
// temporary directory in tests.
func Open(dir string) (*Vars, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("efivarfs: %w", err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("efivarfs: %s is not a directory", dir)
	}
	return &Vars{dir: dir}, nil
}

// validName accepts the ASCII names this package uses (Boot####, BootOrder,
// BootNext, BootCurrent, ...): 1-64 letters, digits and underscores.
func validName(name string) error {
	if name == "" || len(name) > 64 {
		return fmt.Errorf("%w: %q: 1-64 characters", ErrName, name)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_') {
			return fmt.Errorf("%w: %q: character %q (letters, digits and _ only)", ErrName, name, c)
		}
	}
	return nil
}

// path returns the efivarfs file of a variable: Name-guid, the GUID in
// lower case as the kernel writes it.
func (v *Vars) path(name string, vendor GUID) (string, error) {
	if err := validName(name); err != nil {
		return "", err
	}
	return filepath.Join(v.dir, name+"-"+vendor.String()), nil
}

// Read returns a variable: its 4-byte attributes prefix and its data, at
// most MaxDataSize bytes. A missing variable is ErrNotFound; a file too
// short, too long or with unknown attribute bits is ErrVariable.
func (v *Vars) Read(name string, vendor GUID) (Variable, error) {
	p, err := v.path(name, vendor)
	if err != nil {
		return Variable{}, err
	}
	f, err := os.Open(p)
	if errors.Is(err, fs.ErrNotExist) {
		return Variable{}, fmt.Errorf("%w: %s: %w", ErrNotFound, name, err)
	}
	if err != nil {
		return Variable{}, fmt.Errorf("read EFI variable %s: %w", name, err)
	}
	defer f.Close()
	// efivarfs returns the attributes and the whole data in one read; read
	// one byte more than allowed to notice a larger variable.
	b, err := io.ReadAll(io.LimitReader(f, 4+MaxDataSize+1))
	if err != nil {
		return Variable{}, fmt.Errorf("read EFI variable %s: %w", name, err)
	}
	return parseVariable(name, b)
}

func parseVariable(name string, b []byte) (Variable, error) {
	switch {
	case len(b) < 4:
		// efivarfs shows a variable deleted by someone else as an empty
		// file until the directory is read again.
		return Variable{}, fmt.Errorf("%w: %s: %d bytes, shorter than the 4-byte attributes", ErrVariable, name, len(b))
	case len(b) > 4+MaxDataSize:
		return Variable{}, fmt.Errorf("%w: %s: more than %d bytes of data", ErrVariable, name, MaxDataSize)
	}
	attrs := binary.LittleEndian.Uint32(b[:4])
	if attrs&^attrKnown != 0 {
		return Variable{}, fmt.Errorf("%w: %s: unknown attribute bits %#x in %#x", ErrVariable, name, attrs&^attrKnown, attrs)
	}
	return Variable{Attributes: attrs, Data: bytes.Clone(b[4:])}, nil
}

// Write sets a variable to data with attributes NV|BS|RT, creating it if
// needed, in one write(2) of the 4-byte attributes and the data as efivarfs
// requires. An efivarfs file's immutable flag is cleared first. BootOrder
// and the Boot#### entries it lists are refused (ErrListed).
func (v *Vars) Write(name string, vendor GUID, data []byte) error {
	if err := v.guard(name, vendor); err != nil {
		return err
	}
	return v.write(name, vendor, data, false)
}

// create writes a variable that must not exist yet (fs.ErrExist otherwise).
func (v *Vars) create(name string, vendor GUID, data []byte) error {
	if err := v.guard(name, vendor); err != nil {
		return err
	}
	return v.write(name, vendor, data, true)
}

func (v *Vars) write(name string, vendor GUID, data []byte, mustCreate bool) (err error) {
	if len(data) > MaxDataSize {
		return fmt.Errorf("write EFI variable %s: %d bytes of data, at most %d", name, len(data), MaxDataSize)
	}
	p, err := v.path(name, vendor)
	if err != nil {
		return err
	}
	flags := os.O_WRONLY | os.O_CREATE
	if mustCreate {
		flags |= os.O_EXCL
	} else if err := makeMutable(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("write EFI variable %s: %w", name, err)
	}
	// efivarfs replaces the variable with each write; any other file
	// system (tests) needs the old contents truncated.
	if !isEfivarfs(v.dir) {
		flags |= os.O_TRUNC
	}
	f, err := os.OpenFile(p, flags, 0o644)
	if err != nil {
		return fmt.Errorf("write EFI variable %s: %w", name, err)
	}
	buf := binary.LittleEndian.AppendUint32(make([]byte, 0, 4+len(data)), AttrNVBSRT)
	buf = append(buf, data...)
	n, werr := f.Write(buf)
	cerr := f.Close()
	if werr == nil && n != len(buf) {
		werr = io.ErrShortWrite
	}
	if werr == nil {
		werr = cerr
	}
	if werr != nil {
		err = fmt.Errorf("write EFI variable %s: %w", name, werr)
		if mustCreate {
			// Do not leave an empty file behind for a variable the
			// firmware refused.
			if rerr := os.Remove(p); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) {
				err = errors.Join(err, fmt.Errorf("remove EFI variable %s after failed write: %w", name, rerr))
			}
		}
		return err
	}
	return nil
}

// Delete removes a variable; a missing one is ErrNotFound. BootOrder and
// the Boot#### entries it lists are refused (ErrListed).
func (v *Vars) Delete(name string, vendor GUID) error {
	if err := v.guard(name, vendor); err != nil {
		return err
	}
	p, err := v.path(name, vendor)
	if err != nil {
		return err
	}
	if err := makeMutable(p); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("%w: %s: %w", ErrNotFound, name, err)
		}
		return fmt.Errorf("delete EFI variable %s: %w", name, err)
	}
	if err := os.Remove(p); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("%w: %s: %w", ErrNotFound, name, err)
		}
		return fmt.Errorf("delete EFI variable %s: %w", name, err)
	}
	return nil
}

// guard refuses BootOrder and the Boot#### entries BootOrder lists. A
// BootOrder that cannot be read refuses every Boot#### entry.
func (v *Vars) guard(name string, vendor GUID) error {
	if vendor != GlobalVariable {
		return nil
	}
	if name == bootOrderName {
		return fmt.Errorf("%w: %s", ErrListed, name)
	}
	num, ok := parseBootName(name)
	if !ok {
		return nil
	}
	order, err := v.BootOrder()
	if err != nil {
		return fmt.Errorf("%s: cannot tell whether BootOrder lists it: %w", name, err)
	}
	if listed(order, num) {
		return fmt.Errorf("%w: BootOrder lists %s", ErrListed, name)
	}
	return nil
}

// names lists the variable names of vendor in the directory, at most
// maxDirEntries files in all.
func (v *Vars) names(vendor GUID) ([]string, error) {
	f, err := os.Open(v.dir)
	if err != nil {
		return nil, fmt.Errorf("efivarfs: %w", err)
	}
	defer f.Close()
	suffix := "-" + vendor.String()
	var out []string
	seen := 0
	for {
		ents, err := f.ReadDir(256)
		seen += len(ents)
		if seen > maxDirEntries {
			return nil, fmt.Errorf("efivarfs: more than %d entries in %s", maxDirEntries, v.dir)
		}
		for _, e := range ents {
			n := e.Name()
			if len(n) > len(suffix) && n[len(n)-len(suffix):] == suffix {
				out = append(out, n[:len(n)-len(suffix)])
			}
		}
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("efivarfs: %w", err)
		}
	}
}

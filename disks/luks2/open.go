package luks2

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/anatol/devmapper.go"
)

// MapperPath returns the device node of the device-mapper device called
// name. Without udev (as in the appliance's initramfs) /dev/mapper/<name>
// does not exist, so it finds /dev/dm-N through /sys/block/dm-*/dm/name.
func MapperPath(name string) (string, error) {
	if _, err := os.Stat("/dev/mapper/" + name); err == nil {
		return "/dev/mapper/" + name, nil
	}
	dirs, _ := filepath.Glob("/sys/block/dm-*")
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "dm", "name"))
		if err == nil && strings.TrimSpace(string(b)) == name {
			return "/dev/" + filepath.Base(d), nil
		}
	}
	return "", fmt.Errorf("device-mapper device %s not found", name)
}

// Unlock opens the LUKS2 volume at device with passphrase through
// device-mapper (dm-crypt) and returns the mapped device's node. The header
// must pass CheckPolicy (ErrPolicy otherwise); the volume key is recovered
// from that one parsed header and verified against its digest, and the
// dm-crypt table is built from the policy's constants (cipher, sector size,
// data offset), never from header fields, so a header rewritten between
// reads cannot choose how the data is encrypted.
func Unlock(device string, passphrase []byte, name string) (string, error) {
	f, err := os.Open(device)
	if err != nil {
		return "", fmt.Errorf("open LUKS volume %s: %w", device, err)
	}
	defer f.Close()
	h, err := ReadHeader(f)
	if err != nil {
		return "", fmt.Errorf("LUKS2 header of %s: %w", device, err)
	}
	if err := h.CheckPolicy(); err != nil {
		return "", fmt.Errorf("refusing to unlock %s: %w", device, err)
	}
	length, err := dataLength(f, device)
	if err != nil {
		return "", err
	}
	key, err := h.RecoverKey(f, passphrase)
	if err != nil {
		return "", fmt.Errorf("unlock %s: %w", device, err)
	}
	defer clear(key)
	table := devmapper.CryptTable{
		Length:        length,
		BackendDevice: device,
		BackendOffset: DefaultDataOffset,
		Encryption:    Cipher,
		Key:           key,
		SectorSize:    SectorSize,
	}
	// cryptsetup's naming, so that tools recognise the mapping.
	uuid := fmt.Sprintf("CRYPT-LUKS2-%s-%s", strings.ReplaceAll(h.UUID, "-", ""), name)
	if err := devmapper.CreateAndLoad(name, uuid, 0, table); err != nil {
		return "", fmt.Errorf("unlock %s as %s: %w", device, name, err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		p, err := MapperPath(name)
		if err == nil {
			if _, serr := os.Stat(p); serr == nil {
				return p, nil
			}
		}
		if time.Now().After(deadline) {
			Lock(name)
			return "", fmt.Errorf("unlocked %s but its device node did not appear", name)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Lock closes the device-mapper mapping called name; the kernel drops the
// volume key with it.
func Lock(name string) error {
	if err := devmapper.Remove(name); err != nil {
		return fmt.Errorf("close mapping %s: %w", name, err)
	}
	return nil
}

// DropKey takes the volume key of a mapping out of the kernel when the
// mapping cannot be removed because something still holds it open (a
// lazily detached filesystem with open files, a process reading the
// device). It loads a linear table over the same ciphertext on device in
// place of the crypt table and swaps it in: device-mapper destroys the
// crypt target, and dm-crypt wipes its key as it does. Whatever still
// holds the mapping reads ciphertext from then on. device must still be
// there (a disk pulled out cannot be remapped this way).
func DropKey(name, device string) error {
	f, err := os.Open(device)
	if err != nil {
		return fmt.Errorf("drop key of %s: %w", name, err)
	}
	length, err := dataLength(f, device)
	f.Close()
	if err != nil {
		return fmt.Errorf("drop key of %s: %w", name, err)
	}
	ciphertext := devmapper.LinearTable{
		Length:        length,
		BackendDevice: device,
		BackendOffset: DefaultDataOffset,
	}
	if err := devmapper.Load(name, 0, ciphertext); err != nil {
		return fmt.Errorf("drop key of %s: load a linear table: %w", name, err)
	}
	if err := devmapper.Resume(name); err != nil {
		return fmt.Errorf("drop key of %s: swap the table in: %w", name, err)
	}
	return nil
}

// dataLength is the length of the data segment of the volume f (device):
// everything after DefaultDataOffset, which the policy fixes.
func dataLength(f *os.File, device string) (uint64, error) {
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", device, err)
	}
	if size <= DefaultDataOffset || size%SectorSize != 0 {
		return 0, fmt.Errorf("%s: %d bytes is no LUKS2 volume with data at %d", device, size, DefaultDataOffset)
	}
	return uint64(size) - DefaultDataOffset, nil
}

package luks2

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/anatol/luks.go"
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

// Unlock opens the LUKS volume at device with passphrase through
// device-mapper (dm-crypt) using luks.go, and returns the mapped device's
// node.
func Unlock(device string, passphrase []byte, name string) (string, error) {
	dev, err := luks.Open(device)
	if err != nil {
		return "", fmt.Errorf("open LUKS volume %s: %w", device, err)
	}
	defer dev.Close()
	if err := dev.UnlockAny(passphrase, name); err != nil {
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
	if err := luks.Lock(name); err != nil {
		return fmt.Errorf("close mapping %s: %w", name, err)
	}
	return nil
}

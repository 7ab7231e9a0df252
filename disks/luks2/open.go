package luks2

import (
	"fmt"

	"github.com/anatol/luks.go"
)

// MapperPath returns the device-mapper node of an opened volume.
func MapperPath(name string) string { return "/dev/mapper/" + name }

// Unlock opens the LUKS volume at device with passphrase through
// device-mapper (dm-crypt) as /dev/mapper/<name>, using luks.go.
func Unlock(device string, passphrase []byte, name string) (string, error) {
	dev, err := luks.Open(device)
	if err != nil {
		return "", fmt.Errorf("open LUKS volume %s: %w", device, err)
	}
	defer dev.Close()
	if err := dev.UnlockAny(passphrase, name); err != nil {
		return "", fmt.Errorf("unlock %s as %s: %w", device, name, err)
	}
	return MapperPath(name), nil
}

// Lock closes the device-mapper mapping called name; the kernel drops the
// volume key with it.
func Lock(name string) error {
	if err := luks.Lock(name); err != nil {
		return fmt.Errorf("close mapping %s: %w", name, err)
	}
	return nil
}

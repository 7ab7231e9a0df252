package initseq

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"github.com/dataembassy/embassy/appliance/efiboot"
	"github.com/dataembassy/embassy/images/diskimage"
)

// efivarsDir is where efivarfs is mounted.
const efivarsDir = "/sys/firmware/efi/efivars"

// efiVars mounts efivarfs (once; the efivarfs module is loaded at boot)
// and opens it.
func efiVars() (*efiboot.Vars, error) {
	if _, err := os.Stat("/sys/firmware/efi"); err != nil {
		return nil, fmt.Errorf("not booted by UEFI firmware: %w", err)
	}
	if err := syscall.Mount("efivarfs", efivarsDir, "efivarfs", syscall.MS_NOSUID|syscall.MS_NODEV|syscall.MS_NOEXEC, ""); err != nil && !errors.Is(err, syscall.EBUSY) {
		return nil, fmt.Errorf("mount efivarfs: %w", err)
	}
	return efiboot.Open(efivarsDir)
}

// trialPartition is slot B as the firmware sees it on embassy.img.
func trialPartition() (diskimage.Partition, error) {
	for _, p := range diskimage.Layout().Partitions {
		if p.Name == diskimage.NameB {
			return p, nil
		}
	}
	return diskimage.Partition{}, errors.New("the boot disk layout has no trial slot")
}

// setTrialNext makes slot B the firmware's next boot, once: a Boot####
// entry for it (created outside BootOrder, so nothing the platform
// measures changes) and BootNext pointing at it.
func setTrialNext() error {
	v, err := efiVars()
	if err != nil {
		return err
	}
	p, err := trialPartition()
	if err != nil {
		return err
	}
	opt, err := efiboot.BootEntryFor(p)
	if err != nil {
		return err
	}
	num, err := efiboot.EnsureBootEntry(v, opt)
	if err != nil {
		return err
	}
	return efiboot.SetBootNext(v, num)
}

// clearBootNext removes a one-shot boot that is no longer wanted.
func clearBootNext() error {
	v, err := efiVars()
	if err != nil {
		return err
	}
	return efiboot.ClearBootNext(v)
}

package efiboot

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// fsImmutableFL is FS_IMMUTABLE_FL of linux/fs.h; x/sys/unix lacks it.
const fsImmutableFL = 0x00000010

// makeMutable clears the immutable flag of an efivarfs file: the kernel
// sets it on most variables so that rm -rf cannot brick a machine, and
// chattr -i (FS_IOC_SETFLAGS) is the documented way to lift it. Clearing
// it needs CAP_LINUX_IMMUTABLE. File systems without these ioctls (tmpfs in
// tests) answer ENOTTY or EOPNOTSUPP, which is not an error here.
func makeMutable(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fd := int(f.Fd())
	flags, err := unix.IoctlGetUint32(fd, unix.FS_IOC_GETFLAGS)
	if ignorableFlagsErr(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("FS_IOC_GETFLAGS %s: %w", path, err)
	}
	if flags&fsImmutableFL == 0 {
		return nil
	}
	err = unix.IoctlSetPointerInt(fd, unix.FS_IOC_SETFLAGS, int(flags&^fsImmutableFL))
	if ignorableFlagsErr(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("FS_IOC_SETFLAGS %s (clear immutable): %w", path, err)
	}
	return nil
}

func ignorableFlagsErr(err error) bool {
	return errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EOPNOTSUPP)
}

// isEfivarfs reports whether dir is an efivarfs mount.
func isEfivarfs(dir string) bool {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return false
	}
	return uint32(st.Type) == unix.EFIVARFS_MAGIC
}

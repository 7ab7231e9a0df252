// Package fs makes and mounts the ext4 filesystem inside an unlocked data
// volume, with mkfs.ext4 from Debian's e2fsprogs (shipped in the image).
package fs

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"

	"golang.org/x/sys/unix"
)

// Mkfs is the mkfs.ext4 program; the image ships it as /sbin/mkfs.ext4.
const Mkfs = "/sbin/mkfs.ext4"

// MakeExt4 creates an ext4 filesystem with label on device.
func MakeExt4(ctx context.Context, device, label string) error {
	if len(label) > 16 {
		return fmt.Errorf("ext4 label %q is longer than 16 bytes", label)
	}
	cmd := exec.CommandContext(ctx, Mkfs, "-q", "-F", "-L", label,
		"-E", "lazy_itable_init=0,lazy_journal_init=0", "-O", "metadata_csum", device)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("mkfs.ext4 %s: %w: %s", device, err, strings.TrimSpace(out.String()))
	}
	return nil
}

// Mount mounts the ext4 filesystem on device at target (created if needed),
// without device nodes, setuid programs or executables.
func Mount(device, target string) error {
	if err := os.MkdirAll(target, 0o700); err != nil {
		return fmt.Errorf("create mount point %s: %w", target, err)
	}
	flags := uintptr(unix.MS_NODEV | unix.MS_NOSUID | unix.MS_NOEXEC | unix.MS_NOATIME)
	if err := unix.Mount(device, target, "ext4", flags, "errors=remount-ro"); err != nil {
		return fmt.Errorf("mount %s on %s: %w", device, target, err)
	}
	return nil
}

// Detach lazily unmounts target (MNT_DETACH): used when the disk under it
// is gone and a clean unmount cannot finish.
func Detach(target string) error {
	if err := unix.Unmount(target, unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach %s: %w", target, err)
	}
	return nil
}

// Unmount unmounts target.
func Unmount(target string) error {
	if err := unix.Unmount(target, 0); err != nil {
		return fmt.Errorf("unmount %s: %w", target, err)
	}
	return nil
}

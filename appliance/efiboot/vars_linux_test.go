package efiboot

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// setImmutable sets FS_IMMUTABLE_FL as the kernel does on efivarfs files,
// or skips the test where the file system or the user cannot.
func setImmutable(t *testing.T, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	flags, err := unix.IoctlGetUint32(int(f.Fd()), unix.FS_IOC_GETFLAGS)
	if err == nil {
		err = unix.IoctlSetPointerInt(int(f.Fd()), unix.FS_IOC_SETFLAGS, int(flags|fsImmutableFL))
	}
	if errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EPERM) {
		t.Skipf("cannot set the immutable flag here: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = makeMutable(path) })
}

// TestImmutableVariables: Write and Delete clear the immutable flag the
// kernel puts on efivarfs files (on ext4 as root, which allows the flag).
func TestImmutableVariables(t *testing.T) {
	v, dir := fakeVars(t, map[string][]byte{"BootNext": file(AttrNVBSRT, []byte{3, 0})})
	p := filepath.Join(dir, varFile("BootNext"))
	setImmutable(t, p)
	if err := os.WriteFile(p, nil, 0o644); err == nil {
		t.Fatal("immutable flag did not take: plain write succeeded")
	}
	if err := v.Write("BootNext", GlobalVariable, []byte{4, 0}); err != nil {
		t.Fatalf("write of an immutable variable: %v", err)
	}
	if got, err := os.ReadFile(p); err != nil || !bytes.Equal(got, file(AttrNVBSRT, []byte{4, 0})) {
		t.Fatalf("after write: %x %v", got, err)
	}
	setImmutable(t, p)
	if err := ClearBootNext(v); err != nil {
		t.Fatalf("delete of an immutable variable: %v", err)
	}
	if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("BootNext still there: %v", err)
	}
}

package luks2

import (
	"bytes"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// loopDevice attaches a file as a loop device for the test, or skips
// where the test cannot (not root, no loop devices, no device-mapper).
func loopDevice(t *testing.T, path string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for loop devices and device-mapper")
	}
	for _, p := range []string{"/dev/loop-control", "/dev/mapper/control"} {
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			// A container often has the node but no driver (ENODEV).
			t.Skipf("%s unusable here (%v); TestRevokedAppliance covers the lockdown in QEMU", p, err)
		}
		f.Close()
	}
	if _, err := exec.LookPath("dmsetup"); err != nil {
		t.Skip("dmsetup not installed")
	}
	out, err := exec.Command("losetup", "--find", "--show", path).Output()
	if err != nil {
		t.Skipf("losetup: %v", err)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	return dev
}

// kernelTable is what the kernel holds for a mapping, keys included, as
// someone with root on the machine would read it.
func kernelTable(t *testing.T, name string) string {
	t.Helper()
	out, err := exec.Command("dmsetup", "table", "--showkeys", name).CombinedOutput()
	if err != nil {
		t.Fatalf("dmsetup table %s: %v\n%s", name, err, out)
	}
	return string(out)
}

// TestDropKeyOfBusyMapping: a mapping that something holds open cannot be
// removed, so its key would stay in the kernel; DropKey swaps in a linear
// table over the ciphertext. The kernel's table (read with dmsetup
// --showkeys) holds the volume key before and not after, the holder reads
// ciphertext from then on, and the mapping is removed once let go.
func TestDropKeyOfBusyMapping(t *testing.T) {
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 32<<20); err != nil {
		t.Fatal(err)
	}
	pass := bytes.Repeat([]byte{0x5a}, 32)
	if _, err := FormatFile(img, pass, Options{}); err != nil {
		t.Fatal(err)
	}
	dev := loopDevice(t, img)
	name := "embassy-droptest"
	mapper, err := Unlock(dev, pass, name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { Lock(name) })
	key, err := RecoverKey(mustOpen(t, img), pass)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(kernelTable(t, name), hex.EncodeToString(key)) {
		t.Fatal("the kernel's crypt table does not show the volume key: the check below proves nothing")
	}
	plain := bytes.Repeat([]byte("plaintext block "), 256) // 4 KiB
	holder, err := os.OpenFile(mapper, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	if _, err := holder.WriteAt(plain, 0); err != nil {
		t.Fatal(err)
	}
	if err := holder.Sync(); err != nil {
		t.Fatal(err)
	}

	if err := Lock(name); err == nil {
		t.Fatal("a mapping held open was removed: the test needs a busy one")
	}
	if err := DropKey(name, dev); err != nil {
		t.Fatal(err)
	}
	table := kernelTable(t, name)
	if strings.Contains(table, hex.EncodeToString(key)) || strings.Contains(table, "crypt") {
		t.Fatalf("after DropKey the kernel still holds a crypt table: %s", table)
	}
	got := make([]byte, len(plain))
	if _, err := holder.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(got, plain) {
		t.Fatal("the holder still reads plaintext after the key was dropped")
	}
	holder.Close()
	if err := Lock(name); err != nil {
		t.Fatalf("remove the mapping once let go: %v", err)
	}
}

func mustOpen(t *testing.T, path string) *os.File {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

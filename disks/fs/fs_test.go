package fs

import (
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestMakeExt4Errors(t *testing.T) {
	if _, err := exec.LookPath(Mkfs); err != nil {
		t.Skip("mkfs.ext4 not installed")
	}
	if err := MakeExt4(context.Background(), "/dev/null", "this-label-is-far-too-long"); err == nil || !strings.Contains(err.Error(), "longer than 16") {
		t.Errorf("long label: %v", err)
	}
	missing := filepath.Join(t.TempDir(), "nope")
	err := MakeExt4(context.Background(), missing, "x")
	if err == nil || !strings.Contains(err.Error(), "mkfs.ext4 "+missing) {
		t.Errorf("missing device: %v", err)
	}
}

func TestMountErrorsNameTheDevice(t *testing.T) {
	dir := t.TempDir()
	err := Mount(filepath.Join(dir, "no-such-device"), filepath.Join(dir, "mnt"))
	if err == nil || !strings.Contains(err.Error(), "no-such-device") {
		t.Fatalf("got %v", err)
	}
}

package elfdeps

import (
	"os"
	"strings"
	"testing"
)

func TestResolveMke2fs(t *testing.T) {
	const prog = "/sbin/mke2fs"
	if _, err := os.Stat(prog); err != nil {
		t.Skip("e2fsprogs not installed")
	}
	libs, err := Resolve([]string{prog}, DefaultSearchPath)
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(libs, " ")
	for _, want := range []string{"ld-linux-x86-64.so.2", "libc.so.6", "libext2fs.so.2", "libcom_err.so.2"} {
		if !strings.Contains(joined, want) {
			t.Errorf("libraries of mke2fs lack %s: %v", want, libs)
		}
	}
	for i := 1; i < len(libs); i++ {
		if libs[i-1] >= libs[i] {
			t.Fatalf("result not sorted and unique: %v", libs)
		}
	}
}

func TestResolveErrors(t *testing.T) {
	if _, err := Resolve([]string{"/nonexistent"}, DefaultSearchPath); err == nil {
		t.Error("missing program accepted")
	}
	f, _ := os.CreateTemp(t.TempDir(), "notelf")
	f.WriteString("#!/bin/sh\n")
	f.Close()
	if _, err := Resolve([]string{f.Name()}, DefaultSearchPath); err == nil {
		t.Error("non-ELF accepted")
	}
	if _, err := os.Stat("/sbin/mke2fs"); err == nil {
		if _, err := Resolve([]string{"/sbin/mke2fs"}, []string{t.TempDir()}); err == nil || !strings.Contains(err.Error(), "needs") {
			t.Errorf("missing library not reported: %v", err)
		}
	}
}

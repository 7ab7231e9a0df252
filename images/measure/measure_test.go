package measure

import (
	"bytes"
	"encoding/hex"
	"os"
	"testing"

	"github.com/dataembassy/embassy/internal/testenv"
)

func TestLoadOptionsEncoding(t *testing.T) {
	got := LoadOptions("a b")
	want := []byte{'a', 0, ' ', 0, 'b', 0}
	for _, r := range FirmwareInitrdSuffix {
		want = append(want, byte(r), 0)
	}
	want = append(want, 0, 0)
	if !bytes.Equal(got, want) {
		t.Fatalf("LoadOptions = %x, want %x", got, want)
	}
}

// The digests observed in the PCR9 event log of the real image under OVMF
// (see tpm/eventlog/testdata) for the default command line.
func TestCmdlineDigestMatchesObservedBoot(t *testing.T) {
	const cmdline = "console=ttyS0,115200 panic=-1 loglevel=4 lockdown=integrity"
	const observed = "2e929f9b7a5ef97fe923969f2821643f54a6230e36e5e9730c9617ebd1d7b251"
	d := Cmdline(cmdline)
	if hex.EncodeToString(d[:]) != observed {
		t.Fatalf("Cmdline digest %x, the firmware log had %s", d, observed)
	}
}

func TestQEMUDirectKernel(t *testing.T) {
	kernel := testenv.CachedKernel(t)
	img, err := os.ReadFile(kernel)
	if err != nil {
		t.Fatal(err)
	}
	pristine, err := Kernel(img)
	if err != nil {
		t.Fatal(err)
	}
	a, err := QEMUDirectKernel(img, 6<<20, 1024)
	if err != nil {
		t.Fatal(err)
	}
	b, err := QEMUDirectKernel(img, 6<<20+1, 1024)
	if err != nil {
		t.Fatal(err)
	}
	c, err := QEMUDirectKernel(img, 6<<20, 2048)
	if err != nil {
		t.Fatal(err)
	}
	if a == pristine || a == b || a == c {
		t.Fatal("QEMU digest does not depend on the patched initrd size and address")
	}
	// The prediction leaves the caller's buffer alone.
	again, _ := Kernel(img)
	if again != pristine {
		t.Fatal("QEMUDirectKernel modified its input")
	}
	for _, bad := range []struct {
		size, mem int
	}{{0, 1024}, {6 << 20, 64}, {6 << 20, 4096}, {2 << 30, 1024}} {
		if _, err := QEMUDirectKernel(img, bad.size, bad.mem); err == nil {
			t.Errorf("size %d mem %d accepted", bad.size, bad.mem)
		}
	}
	if _, err := QEMUDirectKernel([]byte("MZ not a kernel"), 1, 1024); err == nil {
		t.Error("non-kernel accepted")
	}
}

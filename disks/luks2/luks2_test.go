package luks2

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/anatol/luks.go"
)

func needCryptsetup(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("cryptsetup"); err != nil {
		t.Skip("cryptsetup not installed (make deps installs cryptsetup-bin)")
	}
}

// newDisk makes a sparse file standing in for a disk.
func newDisk(t testing.TB, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return p
}

func secret(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func keyFile(t *testing.T, key []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(p, key, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func formatOurs(t *testing.T) (disk string, pass, volumeKey []byte, uuid string) {
	t.Helper()
	disk = newDisk(t, 64<<20)
	pass = secret(t, 32)
	volumeKey = secret(t, VolumeKeySize)
	uuid, err := FormatFile(disk, pass, Options{volumeKey: volumeKey})
	if err != nil {
		t.Fatal(err)
	}
	return disk, pass, volumeKey, uuid
}

func TestCryptsetupReadsOurVolume(t *testing.T) {
	needCryptsetup(t)
	disk, pass, _, uuid := formatOurs(t)
	out, err := exec.Command("cryptsetup", "luksDump", disk).CombinedOutput()
	if err != nil {
		t.Fatalf("luksDump: %v\n%s", err, out)
	}
	for _, want := range []string{"Version:       \t2", "UUID:          \t" + uuid, "Label:         \t" + DefaultLabel,
		"Subsystem:     \t" + DefaultSubsystem, "cipher: aes-xts-plain64", "PBKDF:      pbkdf2", "Iterations: 1000", "AF stripes: 4000", "Key:        512 bits"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("luksDump lacks %q:\n%s", want, out)
		}
	}
	kf := keyFile(t, pass)
	if out, err := exec.Command("cryptsetup", "open", "--test-passphrase", "--key-file", kf, disk).CombinedOutput(); err != nil {
		t.Fatalf("cryptsetup rejects our key: %v\n%s", err, out)
	}
	wrong := keyFile(t, secret(t, 32))
	if err := exec.Command("cryptsetup", "open", "--test-passphrase", "--key-file", wrong, disk).Run(); err == nil {
		t.Fatal("cryptsetup accepted a wrong key")
	}
}

func TestCryptsetupDumpsOurVolumeKey(t *testing.T) {
	needCryptsetup(t)
	disk, pass, volumeKey, _ := formatOurs(t)
	got := dumpVolumeKey(t, disk, keyFile(t, pass))
	if !bytes.Equal(got, volumeKey) {
		t.Fatalf("cryptsetup recovers %x, we stored %x", got, volumeKey)
	}
}

// dumpVolumeKey asks cryptsetup for the volume key.
func dumpVolumeKey(t *testing.T, disk, kf string) []byte {
	t.Helper()
	out, err := exec.Command("cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", kf, disk).CombinedOutput()
	if err != nil {
		t.Fatalf("dump volume key: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`(?s)MK dump:\s*(.*)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("no MK dump in:\n%s", out)
	}
	key, err := hex.DecodeString(strings.Join(strings.Fields(string(m[1])), ""))
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func TestLuksGoRecoversOurVolumeKey(t *testing.T) {
	disk, pass, volumeKey, uuid := formatOurs(t)
	dev, err := luks.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	if dev.UUID() != uuid {
		t.Errorf("luks.go UUID %q, want %q", dev.UUID(), uuid)
	}
	vol, err := dev.UnsealVolume(0, pass)
	if err != nil {
		t.Fatalf("luks.go cannot unseal our keyslot: %v", err)
	}
	// luks.go keeps the key private; read it to compare byte for byte.
	got := reflect.ValueOf(vol).Elem().FieldByName("key").Bytes()
	if !bytes.Equal(got, volumeKey) {
		t.Fatal("luks.go recovered a different volume key")
	}
	if vol.StorageOffset != DefaultDataOffset || vol.StorageEncryption != Cipher || vol.StorageSectorSize != SectorSize {
		t.Errorf("luks.go sees segment %+v", vol)
	}
	if _, err := dev.UnsealVolume(0, secret(t, 32)); err == nil {
		t.Fatal("luks.go unsealed with a wrong key")
	}
}

func TestRecoverOurVolumeKey(t *testing.T) {
	disk, pass, volumeKey, _ := formatOurs(t)
	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, err := RecoverKey(f, pass)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, volumeKey) {
		t.Fatal("recovered a different key")
	}
	if _, err := RecoverKey(f, secret(t, 32)); !errors.Is(err, ErrWrongKey) {
		t.Fatalf("wrong key: %v", err)
	}
	h, err := ReadHeader(f)
	if err != nil {
		t.Fatal(err)
	}
	if h.Label != DefaultLabel || h.Subsystem != DefaultSubsystem {
		t.Errorf("label %q subsystem %q", h.Label, h.Subsystem)
	}
}

func TestSecondaryHeaderTakesOver(t *testing.T) {
	disk, pass, volumeKey, _ := formatOurs(t)
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// Damage the primary JSON area: its checksum no longer matches.
	if _, err := f.WriteAt([]byte("XXXX"), 4200); err != nil {
		t.Fatal(err)
	}
	got, err := RecoverKey(f, pass)
	if err != nil {
		t.Fatalf("secondary header not used: %v", err)
	}
	if !bytes.Equal(got, volumeKey) {
		t.Fatal("recovered a different key")
	}
	// Both damaged: a clear error, not a panic.
	f.WriteAt([]byte("XXXX"), DefaultHdrSize+4200)
	if _, err := RecoverKey(f, pass); err == nil || !strings.Contains(err.Error(), "checksum") {
		t.Fatalf("both headers damaged: %v", err)
	}
}

func cryptsetupFormat(t *testing.T, kf string, args ...string) string {
	t.Helper()
	disk := newDisk(t, 64<<20)
	full := append([]string{"luksFormat", "--type", "luks2", "--batch-mode", "--key-file", kf}, args...)
	full = append(full, disk)
	if out, err := exec.Command("cryptsetup", full...).CombinedOutput(); err != nil {
		t.Fatalf("cryptsetup %v: %v\n%s", args, err, out)
	}
	return disk
}

func TestReadCryptsetupVolumes(t *testing.T) {
	needCryptsetup(t)
	pass := secret(t, 32)
	kf := keyFile(t, pass)
	cases := []struct {
		name string
		args []string
	}{
		{"pbkdf2", []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"}},
		{"pbkdf2 sha512", []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--hash", "sha512"}},
		{"argon2id", []string{"--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768", "--pbkdf-parallel", "1"}},
		{"argon2i", []string{"--pbkdf", "argon2i", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768", "--pbkdf-parallel", "1"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			disk := cryptsetupFormat(t, kf, c.args...)
			want := dumpVolumeKey(t, disk, kf)
			f, err := os.Open(disk)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			got, err := RecoverKey(f, pass)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatal("recovered key differs from cryptsetup's")
			}
		})
	}
}

func TestRejectUnsupportedCryptsetupVolumes(t *testing.T) {
	needCryptsetup(t)
	pass := secret(t, 32)
	kf := keyFile(t, pass)
	for _, c := range []struct {
		name string
		args []string
	}{
		{"xts-plain (32-bit IV)", []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--cipher", "aes-xts-plain"}},
		{"keyslot cipher cbc", []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--keyslot-cipher", "aes-cbc-essiv:sha256", "--keyslot-key-size", "256"}},
		{"cbc-essiv", []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			disk := cryptsetupFormat(t, kf, c.args...)
			f, err := os.Open(disk)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := ReadHeader(f); err != nil {
				t.Fatalf("the header itself is valid and must parse: %v", err)
			}
			if _, err := RecoverKey(f, pass); !errors.Is(err, ErrUnsupported) {
				t.Fatalf("got %v, want ErrUnsupported", err)
			}
		})
	}
}

func TestNotLUKS(t *testing.T) {
	disk := newDisk(t, 1<<20)
	f, _ := os.Open(disk)
	defer f.Close()
	if _, err := ReadHeader(f); !errors.Is(err, ErrNotLUKS2) {
		t.Fatalf("blank disk: %v", err)
	}
}

func TestFormatRejects(t *testing.T) {
	small := newDisk(t, 8<<20)
	if _, err := FormatFile(small, []byte("k"), Options{}); err == nil {
		t.Error("formatted a disk smaller than the metadata area")
	}
	big := newDisk(t, 64<<20)
	if _, err := FormatFile(big, nil, Options{}); err == nil {
		t.Error("formatted with an empty passphrase")
	}
	if _, err := FormatFile(big, []byte("k"), Options{Iterations: 10}); err == nil {
		t.Error("accepted 10 PBKDF2 iterations")
	}
}

func TestAFRoundTrip(t *testing.T) {
	for _, n := range []int{32, 64, 33} {
		key := secret(t, n)
		m, err := afSplit(key, 17, sha256.New())
		if err != nil {
			t.Fatal(err)
		}
		got, err := afMerge(m, n, 17, sha256.New())
		if err != nil || !bytes.Equal(got, key) {
			t.Fatalf("AF round trip for %d bytes: %v", n, err)
		}
	}
}

func FuzzReadHeader(f *testing.F) {
	disk := newDisk(f, 64<<20)
	if _, err := FormatFile(disk, []byte("seed"), Options{}); err != nil {
		f.Fatal(err)
	}
	b, _ := os.ReadFile(disk)
	f.Add(b[:2*DefaultHdrSize])
	f.Add(b[:4096])
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		h, err := ReadHeader(r)
		if err != nil {
			return
		}
		h.DataOffset()
		h.RecoverKey(r, []byte("seed"))
	})
}

func writeFile(p string, b []byte) error { return os.WriteFile(p, b, 0o600) }

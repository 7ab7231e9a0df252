package kmod

import (
	"reflect"
	"strings"
	"testing"
)

const sampleDep = `kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/drivers/md/dm-crypt.ko: kernel/drivers/md/dm-mod.ko
kernel/drivers/md/dm-mod.ko:
kernel/drivers/block/virtio_blk.ko:
`

func TestResolve(t *testing.T) {
	d, err := ParseDep(strings.NewReader(sampleDep))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		names   []string
		builtin map[string]bool
		want    []string
	}{
		{[]string{"ext4"}, nil, []string{"kernel/fs/jbd2/jbd2.ko", "kernel/fs/mbcache.ko", "kernel/lib/crc16.ko", "kernel/fs/ext4/ext4.ko"}},
		{[]string{"dm-crypt", "dm_mod"}, nil, []string{"kernel/drivers/md/dm-mod.ko", "kernel/drivers/md/dm-crypt.ko"}},
		{[]string{"virtio_blk", "tpm_crb"}, map[string]bool{"tpm_crb": true}, []string{"kernel/drivers/block/virtio_blk.ko"}},
	}
	for _, tc := range tests {
		got, err := d.Resolve(tc.names, tc.builtin)
		if err != nil {
			t.Fatalf("Resolve(%v): %v", tc.names, err)
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("Resolve(%v) = %v, want %v", tc.names, got, tc.want)
		}
	}
	if _, err := d.Resolve([]string{"nosuch"}, nil); err == nil || !strings.Contains(err.Error(), "nosuch") {
		t.Errorf("unknown module: %v", err)
	}
	sub, err := d.Subset([]string{"kernel/drivers/md/dm-mod.ko", "kernel/drivers/md/dm-crypt.ko"})
	if err != nil {
		t.Fatal(err)
	}
	if string(sub) != "kernel/drivers/md/dm-mod.ko:\nkernel/drivers/md/dm-crypt.ko: kernel/drivers/md/dm-mod.ko\n" {
		t.Errorf("Subset = %q", sub)
	}
}

func TestResolveErrors(t *testing.T) {
	cyclic, err := ParseDep(strings.NewReader("a.ko: b.ko\nb.ko: a.ko\n"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cyclic.Resolve([]string{"a"}, nil); err == nil || !strings.Contains(err.Error(), "cycle") {
		t.Errorf("cycle: %v", err)
	}
	dangling, _ := ParseDep(strings.NewReader("a.ko: gone.ko\n"))
	if _, err := dangling.Resolve([]string{"a"}, nil); err == nil || !strings.Contains(err.Error(), "gone.ko") {
		t.Errorf("dangling dependency: %v", err)
	}
}

func TestParseDepRejects(t *testing.T) {
	for _, in := range []string{
		"no colon here.ko\n",
		"/abs/path.ko:\n",
		"../escape.ko:\n",
		"a.ko: ../../etc/passwd\n",
		"kernel/notamodule.txt:\n",
	} {
		if _, err := ParseDep(strings.NewReader(in)); err == nil {
			t.Errorf("accepted %q", in)
		}
	}
}

func TestName(t *testing.T) {
	for in, want := range map[string]string{
		"kernel/drivers/md/dm-crypt.ko":         "dm_crypt",
		"kernel/arch/x86/crypto/aesni-intel.ko": "aesni_intel",
		"kernel/fs/ext4/ext4.ko.xz":             "ext4",
	} {
		if got := Name(in); got != want {
			t.Errorf("Name(%q) = %q, want %q", in, got, want)
		}
	}
}

func FuzzParseDep(f *testing.F) {
	f.Add(sampleDep)
	f.Add("a.ko: b.ko\nb.ko: a.ko\n")
	f.Fuzz(func(t *testing.T, in string) {
		d, err := ParseDep(strings.NewReader(in))
		if err != nil {
			return
		}
		for p := range d {
			if _, err := d.Resolve([]string{Name(p)}, nil); err != nil && !strings.Contains(err.Error(), "cycle") && !strings.Contains(err.Error(), "not in modules.dep") {
				t.Fatalf("unexpected resolve error: %v", err)
			}
		}
	})
}

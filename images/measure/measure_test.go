package measure

import (
	"bytes"
	"crypto/x509"
	"encoding/hex"
	"testing"

	"github.com/dataembassy/embassy/images/ovmfvars"
)

func TestLoadOptionsEncoding(t *testing.T) {
	got := LoadOptions("a b")
	want := []byte{'a', 0, ' ', 0, 'b', 0, 0, 0}
	if !bytes.Equal(got, want) {
		t.Fatalf("LoadOptions = %x, want %x", got, want)
	}
}

// Digests observed in the event log of the real image booted from its disk
// under OVMF's Secure Boot build (see tpm/eventlog/testdata).
func TestDigestsMatchObservedBoot(t *testing.T) {
	const cmdline = "console=ttyS0,115200 panic=-1 loglevel=4 lockdown=integrity module.sig_enforce=1 " +
		"intel_iommu=on amd_iommu=force_isolation iommu.passthrough=0 iommu.strict=1 efi=disable_early_pci_dma init_on_free=1"
	hexOf := func(d [32]byte) string { return hex.EncodeToString(d[:]) }
	for _, c := range []struct {
		name     string
		got      [32]byte
		observed string
	}{
		{"PCR9 load options", Cmdline(cmdline), "ec185321ed8480b5523a003cf68ff787d52e7afd6e298ab360dbdea1d2caaf61"},
		{"PCR7 SecureBoot=1", VariableEvent(ovmfvars.GlobalVariable, "SecureBoot", []byte{1}), "ccfc4bb32888a345bc8aeadaba552b627d99348c767681ab3141f5b01e40a40e"},
		{"PCR7 empty dbx", VariableEvent(ovmfvars.ImageSecurityDatabase, "dbx", nil), "9f75b6823bff6af1024a4e2036719cdd548d3cbc2bf1de8e7ef4d0ed01f94bf9"},
		{"separator", Separator, "df3f619804a92fdb4057192dc43dd748ea778adc52bc498ce80524c014b81119"},
	} {
		if hexOf(c.got) != c.observed {
			t.Errorf("%s: predicted %s, the firmware logged %s", c.name, hexOf(c.got), c.observed)
		}
	}
}

func TestSecureBootNeedsAllKeys(t *testing.T) {
	c := &x509.Certificate{Raw: []byte{0x30, 0}}
	for _, k := range []ovmfvars.SecureBootKeys{{KEK: c, DB: c}, {PK: c, DB: c}, {PK: c, KEK: c}} {
		if _, err := SecureBoot(k); err == nil {
			t.Errorf("predicted PCR7 without a key: %+v", k)
		}
	}
	ev, err := SecureBoot(ovmfvars.SecureBootKeys{PK: c, KEK: c, DB: c})
	if err != nil || len(ev) != 7 || ev[5] != Separator {
		t.Fatalf("SecureBoot = %d events, %v", len(ev), err)
	}
	withDBX, err := SecureBoot(ovmfvars.SecureBootKeys{PK: c, KEK: c, DB: c, DBX: [][32]byte{{1}}})
	if err != nil || withDBX[4] == ev[4] || withDBX[3] != ev[3] {
		t.Fatalf("a dbx entry must change the dbx event and nothing before it: %v", err)
	}
}

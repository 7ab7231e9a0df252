package qemutests

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"testing"

	"github.com/dataembassy/embassy/disks/luks2"
	"github.com/dataembassy/embassy/keys/shamir"
)

// diskSecrets are what the tests know of one provisioned disk, to look for
// them from outside the guest (memory dumps, bus recordings): the shares
// the brokers received, the LUKS passphrase they recombine to, and the
// volume key that passphrase opens.
type diskSecrets struct {
	uuid       string
	shares     [][]byte // Shamir encoding, as deposited
	passphrase []byte
	volumeKey  []byte
}

// learnDiskSecrets recombines the deposited shares of each of an
// appliance's disks (the LUKS UUIDs the brokers hold shares for) and opens
// the volume key from the disk images.
func learnDiskSecrets(t testing.TB, hb *hostBrokers, uuids []string, images []string) []diskSecrets {
	t.Helper()
	hb.depositsMu.Lock()
	defer hb.depositsMu.Unlock()
	var out []diskSecrets
	for _, uuid := range uuids {
		ds := diskSecrets{uuid: uuid, shares: hb.deposits[uuid]}
		var parsed []shamir.Share
		for _, b := range ds.shares {
			s, err := shamir.Parse(b)
			if err != nil {
				t.Fatalf("deposited share of %s: %v", uuid, err)
			}
			parsed = append(parsed, s)
		}
		pass, err := shamir.Combine(parsed)
		if err != nil {
			t.Fatalf("recombine the deposited shares of %s (%d): %v", uuid, len(parsed), err)
		}
		ds.passphrase = pass
		for _, img := range images {
			if key, err := volumeKey(img, pass); err == nil {
				ds.volumeKey = key
				break
			}
		}
		if ds.volumeKey == nil {
			t.Fatalf("no disk image opens with the passphrase of %s", uuid)
		}
		out = append(out, ds)
	}
	return out
}

// volumeKey opens the LUKS2 volume on a disk image (the first partition's
// header, found by its magic) with passphrase.
func volumeKey(image string, passphrase []byte) ([]byte, error) {
	f, err := os.Open(image)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	buf := make([]byte, 6)
	for off := int64(0); off < 64<<20 && off < st.Size(); off += 512 {
		if _, err := f.ReadAt(buf, off); err != nil {
			return nil, err
		}
		if bytes.Equal(buf, []byte("LUKS\xba\xbe")) {
			return luks2.RecoverKey(io.NewSectionReader(f, off, st.Size()-off), passphrase)
		}
	}
	return nil, fmt.Errorf("%s: no LUKS2 header", image)
}

// secretForms are the ways a secret can sit in memory or on a wire: raw,
// hex (both cases) and base64 (at each of the three alignments inside a
// longer base64 text, the part that does not depend on its neighbours).
func secretForms(secret []byte) map[string][]byte {
	forms := map[string][]byte{
		"raw":       secret,
		"hex":       []byte(hex.EncodeToString(secret)),
		"HEX":       bytes.ToUpper([]byte(hex.EncodeToString(secret))),
		"base64":    []byte(base64.StdEncoding.EncodeToString(secret)),
		"base64url": []byte(base64.RawURLEncoding.EncodeToString(secret)),
	}
	for shift := 1; shift <= 2; shift++ {
		enc := base64.StdEncoding.EncodeToString(append(make([]byte, shift), secret...))
		// Skip the characters that mix in the padding bytes; drop the tail
		// that depends on what follows.
		start := (shift*8 + 5) / 6
		end := len(enc) - 4
		if end > start {
			forms[fmt.Sprintf("base64+%d", shift)] = []byte(enc[start:end])
		}
	}
	return forms
}

// findSecrets returns where each named secret appears in data, in any of
// its forms.
func findSecrets(data []byte, secrets map[string][]byte) []string {
	var found []string
	for name, s := range secrets {
		for form, pat := range secretForms(s) {
			if i := bytes.Index(data, pat); i >= 0 {
				found = append(found, fmt.Sprintf("%s (%s) at offset %#x", name, form, i))
			}
		}
	}
	return found
}

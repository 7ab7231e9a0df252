package luks2

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"strings"
	"testing"
)

// formattedJSON formats a small volume and returns its JSON area and the
// header's identity, for rewriting.
func formattedJSON(t testing.TB) (*Header, []byte) {
	t.Helper()
	disk := newDisk(t, 32<<20)
	if _, err := FormatFile(disk, []byte("pass"), Options{}); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h, err := ReadHeader(f)
	if err != nil {
		t.Fatal(err)
	}
	return h, append([]byte(nil), h.metaJSON...)
}

// withJSON builds a primary header around js with a valid checksum, as a
// person with the disk and a text editor would, and parses it back.
func withJSON(t testing.TB, like *Header, js []byte) (*Header, error) {
	t.Helper()
	b, err := marshalHeader(DefaultHdrSize, like.SeqID+1, like.Label, like.Subsystem, like.UUID, make([]byte, saltLen), 0, magicPrimary, js)
	if err != nil {
		return nil, err
	}
	return ReadHeader(bytes.NewReader(b))
}

// edit applies f to the decoded JSON area and encodes it again.
func edit(t *testing.T, js []byte, f func(m map[string]any)) []byte {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(js, &m); err != nil {
		t.Fatal(err)
	}
	f(m)
	out, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func obj(m map[string]any, path ...string) map[string]any {
	for _, p := range path {
		m = m[p].(map[string]any)
	}
	return m
}

func TestPolicyAcceptsWhatFormatWrites(t *testing.T) {
	h, _ := formattedJSON(t)
	if err := h.CheckPolicy(); err != nil {
		t.Fatalf("a header Format wrote: %v", err)
	}
}

// TestPolicyRefusesRewrittenHeaders rewrites one field at a time, keeping a
// valid checksum (the parser accepts every one of them), and expects
// ErrPolicy naming the difference.
func TestPolicyRefusesRewrittenHeaders(t *testing.T) {
	h, js := formattedJSON(t)
	cases := []struct {
		name, want string
		f          func(m map[string]any)
	}{
		{"null cipher on the data segment", "cipher_null", func(m map[string]any) { obj(m, "segments", "0")["encryption"] = "cipher_null-ecb" }},
		{"weaker data cipher", "aes-cbc", func(m map[string]any) { obj(m, "segments", "0")["encryption"] = "aes-cbc-essiv:sha256" }},
		{"4096-byte sectors", "sector size", func(m map[string]any) { obj(m, "segments", "0")["sector_size"] = 4096 }},
		{"data segment moved", "data segment at", func(m map[string]any) { obj(m, "segments", "0")["offset"] = "4194304" }},
		{"fixed segment size", "size", func(m map[string]any) { obj(m, "segments", "0")["size"] = "1048576" }},
		{"IV tweak", "IV tweak", func(m map[string]any) { obj(m, "segments", "0")["iv_tweak"] = "7" }},
		{"second segment", "segments", func(m map[string]any) {
			obj(m, "segments")["1"] = obj(m, "segments", "0")
		}},
		{"second keyslot", "keyslots", func(m map[string]any) { obj(m, "keyslots")["1"] = obj(m, "keyslots", "0") }},
		{"slow KDF", "iterations", func(m map[string]any) { obj(m, "keyslots", "0", "kdf")["iterations"] = 1 << 30 }},
		{"argon2 KDF", "argon2id", func(m map[string]any) {
			k := obj(m, "keyslots", "0", "kdf")
			k["type"], k["time"], k["memory"], k["cpus"] = "argon2id", 4, 1<<20, 4
			delete(k, "iterations")
			delete(k, "hash")
		}},
		{"keyslot area cipher", "keyslot area", func(m map[string]any) { obj(m, "keyslots", "0", "area")["encryption"] = "aes-cbc-plain" }},
		{"keyslot area moved", "keyslot area at", func(m map[string]any) { obj(m, "keyslots", "0", "area")["offset"] = "65536" }},
		{"token", "tokens", func(m map[string]any) {
			obj(m, "tokens")["0"] = map[string]any{"type": "systemd-tpm2", "keyslots": []string{"0"}}
		}},
		{"config flag", "differs", func(m map[string]any) { obj(m, "config")["flags"] = []string{"allow-discards"} }},
		{"mandatory requirement", "unknown field", func(m map[string]any) {
			obj(m, "config")["requirements"] = map[string]any{"mandatory": []string{"online-reencrypt"}}
		}},
		{"unknown segment field", "unknown field", func(m map[string]any) {
			obj(m, "segments", "0")["integrity"] = map[string]any{"type": "hmac(sha256)"}
		}},
		{"short salt", "salt", func(m map[string]any) { obj(m, "keyslots", "0", "kdf")["salt"] = "AAAA" }},
		{"AF hash", "differs", func(m map[string]any) { obj(m, "keyslots", "0", "af")["hash"] = "sha1" }},
		{"keyslot priority", "differs", func(m map[string]any) { obj(m, "keyslots", "0")["priority"] = 2 }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := withJSON(t, h, edit(t, js, tc.f))
			if err != nil {
				t.Fatalf("the parser refused the rewritten header (the policy is what must refuse it): %v", err)
			}
			err = got.CheckPolicy()
			if !errors.Is(err, ErrPolicy) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("CheckPolicy = %v, want ErrPolicy mentioning %q", err, tc.want)
			}
		})
	}
	// The unchanged JSON, re-checksummed, is still ours.
	if same, err := withJSON(t, h, js); err != nil || same.CheckPolicy() != nil {
		t.Fatalf("unchanged JSON refused: %v", err)
	}
}

// FuzzHeaderPolicy puts arbitrary JSON behind a valid checksum, so that it
// reaches the JSON parser, the validation and the policy (FuzzReadHeader's
// inputs almost all stop at the checksum). Whatever passes the policy must
// be a volume the appliance would unlock the same way as its own.
func FuzzHeaderPolicy(f *testing.F) {
	h, js := formattedJSON(f)
	f.Add(js)
	f.Add([]byte(`{"keyslots":{},"tokens":{},"segments":{"0":{"type":"crypt","offset":"16777216","size":"dynamic","iv_tweak":"0","encryption":"cipher_null","sector_size":512}},"digests":{},"config":{"json_size":"12288","keyslots_size":"16744448"}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		got, err := withJSON(t, h, data)
		if err != nil {
			return
		}
		if got.CheckPolicy() != nil {
			return
		}
		seg := got.Meta.Segments["0"]
		ks := got.Meta.Keyslots["0"]
		if len(got.Meta.Segments) != 1 || seg.Encryption != Cipher || seg.SectorSize != SectorSize || seg.Offset != "16777216" ||
			len(got.Meta.Keyslots) != 1 || ks.KDF.Type != "pbkdf2" || ks.KDF.Iterations != DefaultIterations || len(got.Meta.Tokens) != 0 {
			t.Fatalf("policy passed a header that is not ours: %+v", got.Meta)
		}
	})
}

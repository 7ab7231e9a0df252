package opclient_test

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/operator/opclient"
)

// logOf makes n chained entries.
func logOf(n int) []audit.Entry {
	entries := make([]audit.Entry, n)
	for i := range entries {
		entries[i] = audit.Entry{Event: "approve-image", Result: "ok", Time: time.Unix(int64(1000+i), 0).UTC()}
	}
	audit.Chain(entries)
	return entries
}

func sign(t *testing.T, key ed25519.PrivateKey, name string, entries []audit.Entry, n int) *audit.SignedHead {
	t.Helper()
	h := audit.Head{}
	if n > 0 {
		h = audit.Head{Seq: entries[n-1].Seq, Hash: entries[n-1].Hash}
	}
	s, err := audit.SignHead(key, name, h, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestCheckAudit(t *testing.T) {
	pub, key, _ := ed25519.GenerateKey(rand.Reader)
	_, otherKey, _ := ed25519.GenerateKey(rand.Reader)
	b := opclient.Broker{Name: "broker-a", URL: "https://x", AuditKey: pub}
	entries := logOf(6)
	rewritten := logOf(6)
	rewritten[3].Result = "fail"
	audit.Chain(rewritten)
	broken := logOf(6)
	broken[2].Result = "fail" // not rechained
	recorded := []audit.SignedHead{*sign(t, key, "broker-a", entries, 2), *sign(t, key, "broker-a", entries, 4)}

	tests := []struct {
		name     string
		broker   opclient.Broker
		ar       audit.Response
		recorded []audit.SignedHead
		status   opclient.AuditStatus
		seq      uint64
	}{
		{"first check of an empty log", b, audit.Response{Signed: sign(t, key, "broker-a", nil, 0)}, nil, opclient.AuditOK, 0},
		{"first check", b, audit.Response{Entries: entries, Signed: sign(t, key, "broker-a", entries, 6)}, nil, opclient.AuditOK, 0},
		{"recorded heads still in the chain", b, audit.Response{Entries: entries, Signed: sign(t, key, "broker-a", entries, 6)}, recorded, opclient.AuditOK, 0},
		{"no pinned key", opclient.Broker{Name: "broker-a"}, audit.Response{Entries: entries, Signed: sign(t, key, "broker-a", entries, 6)}, nil, opclient.AuditNoKey, 0},
		{"no signed head", b, audit.Response{Entries: entries}, nil, opclient.AuditBadSignature, 0},
		{"signed with another key", b, audit.Response{Entries: entries, Signed: sign(t, otherKey, "broker-a", entries, 6)}, nil, opclient.AuditBadSignature, 0},
		{"another broker's head", b, audit.Response{Entries: entries, Signed: sign(t, key, "broker-b", entries, 6)}, nil, opclient.AuditBadSignature, 0},
		{"chain broken", b, audit.Response{Entries: broken, Signed: sign(t, key, "broker-a", broken, 6)}, nil, opclient.AuditChainBroken, 0},
		{"signed head is not the last entry", b, audit.Response{Entries: entries, Signed: sign(t, key, "broker-a", entries, 5)}, nil, opclient.AuditChainBroken, 0},
		{"rewritten after the first recorded head", b, audit.Response{Entries: rewritten, Signed: sign(t, key, "broker-a", rewritten, 6)}, recorded, opclient.AuditRewritten, 4},
		{"rolled back", b, audit.Response{Entries: entries[:3], Signed: sign(t, key, "broker-a", entries, 3)}, recorded, opclient.AuditRolledBack, 4},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			v := opclient.CheckAudit(tc.broker, &tc.ar, tc.recorded)
			if v.Status != tc.status || v.Seq != tc.seq || (tc.status != opclient.AuditOK) == (v.Detail == "") {
				t.Fatalf("verdict %+v, want %s at %d", v, tc.status, tc.seq)
			}
			if tc.status == opclient.AuditRewritten && !strings.Contains(v.Detail, "one of entries 3-4") {
				t.Fatalf("detail does not bound the rewrite: %s", v.Detail)
			}
		})
	}
}

func TestHeadsFile(t *testing.T) {
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	entries := logOf(3)
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "audit-heads.json")
	h, err := opclient.LoadHeads(path)
	if err != nil || len(h.Brokers) != 0 {
		t.Fatalf("missing file: %v %+v", err, h)
	}
	s2, s3 := sign(t, key, "broker-a", entries, 2), sign(t, key, "broker-a", entries, 3)
	if !h.Record(*s2) || !h.Record(*s3) || h.Record(*sign(t, key, "broker-a", entries, 3)) {
		t.Fatal("Record does not append new heads only")
	}
	if err := opclient.SaveHeads(path, h); err != nil {
		t.Fatal(err)
	}
	got, err := opclient.LoadHeads(path)
	if err != nil || len(got.Brokers["broker-a"]) != 2 || got.Brokers["broker-a"][1].Seq != 3 {
		t.Fatalf("round trip: %v %+v", err, got)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "sub", ".audit-heads-*")); len(left) != 0 {
		t.Fatalf("temporary files left: %v", left)
	}
	good, _ := os.ReadFile(path)

	edit := func(f func(m map[string]any)) []byte {
		var m map[string]any
		json.Unmarshal(good, &m)
		f(m)
		b, _ := json.Marshal(m)
		return b
	}
	head := func(m map[string]any, i int) map[string]any {
		return m["brokers"].(map[string]any)["broker-a"].([]any)[i].(map[string]any)
	}
	tests := []struct {
		name string
		data []byte
		want string
	}{
		{"not JSON", []byte("{"), "unexpected EOF"},
		{"trailing data", append(bytes.Clone(good), []byte("{}")...), "data after the JSON object"},
		{"unknown field", edit(func(m map[string]any) { m["extra"] = 1 }), `unknown field "extra"`},
		{"another version", edit(func(m map[string]any) { m["version"] = 2 }), "version 2, want 1"},
		{"no version", edit(func(m map[string]any) { delete(m, "version") }), "version 0, want 1"},
		{"head of another broker", edit(func(m map[string]any) { head(m, 0)["broker"] = "broker-b" }), `signed for broker "broker-b"`},
		{"bad hash", edit(func(m map[string]any) { head(m, 1)["hash"] = "XYZ" }), "head 2: hash \"XYZ\" is not 64"},
		{"no signature", edit(func(m map[string]any) { delete(head(m, 1), "signature") }), "signature is 0 bytes"},
		{"no time", edit(func(m map[string]any) { delete(head(m, 1), "time") }), "head 2 has no time"},
		{"sequence goes back", edit(func(m map[string]any) { head(m, 1)["seq"] = 1 }), "goes back from entry 2 to 1"},
		{"too large", append(bytes.Clone(good), bytes.Repeat([]byte(" "), opclient.MaxHeadsFileSize)...), "larger than"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "heads.json")
			os.WriteFile(p, tc.data, 0o600)
			_, err := opclient.LoadHeads(p)
			if !errors.Is(err, opclient.ErrHeadsFile) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), p) {
				t.Fatalf("error %v, want %q naming %s", err, tc.want, p)
			}
		})
	}
}

package broker_test

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"encoding/pem"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/internal/cli/embassyctl"
	"github.com/dataembassy/embassy/operator/opclient"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// ctl runs embassyctl against the test brokers: an operator certificate,
// the broker CA and a broker list pinning each broker's audit key, in dir.
type ctl struct {
	e   *env
	dir string
}

func newCtl(t *testing.T, e *env) *ctl {
	t.Helper()
	c := &ctl{e: e, dir: t.TempDir()}
	key, _ := pki.NewKey()
	leaf, err := e.operatorCA.Leaf("operator carol", nil, &key.PublicKey, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := pki.WritePEM(filepath.Join(c.dir, "operator.pem"), leaf, filepath.Join(c.dir, "operator.key"), key); err != nil {
		t.Fatal(err)
	}
	// The fallback CA bundle: every broker's own root.
	var bundle []byte
	for _, rb := range e.brokers {
		bundle = append(bundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: rb.root.Cert.Raw})...)
	}
	if err := os.WriteFile(filepath.Join(c.dir, "broker-ca.pem"), bundle, 0o644); err != nil {
		t.Fatal(err)
	}
	return c
}

// run writes the broker list (a restarted broker listens on a new
// operator port) and runs embassyctl with args.
func (c *ctl) run(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var list []opclient.Broker
	for _, rb := range c.e.brokers {
		list = append(list, opclient.Broker{Name: rb.name, URL: "https://" + rb.opLn.Addr().String(),
			AuditKey: rb.auditKey.Public().(ed25519.PublicKey)})
	}
	data, _ := json.Marshal(list)
	if err := os.WriteFile(filepath.Join(c.dir, "brokers.json"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	root := embassyctl.NewRootCmd()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SilenceErrors, root.SilenceUsage = true, true
	root.SetArgs(append([]string{"--brokers", filepath.Join(c.dir, "brokers.json"), "--cert", filepath.Join(c.dir, "operator.pem"),
		"--key", filepath.Join(c.dir, "operator.key"), "--ca", filepath.Join(c.dir, "broker-ca.pem")}, args...))
	err := root.Execute()
	return out.String(), err
}

// verdicts runs `audit verify --json` with the heads file and decodes it.
func (c *ctl) verdicts(t *testing.T, heads string) ([]opclient.HeadVerdict, error) {
	t.Helper()
	out, err := c.run(t, "--json", "audit", "verify", "--heads", heads)
	var vs []opclient.HeadVerdict
	if jerr := json.Unmarshal([]byte(out), &vs); jerr != nil {
		t.Fatalf("audit verify --json: %v (%v)\n%s", jerr, err, out)
	}
	return vs, err
}

// readLog reads broker i's audit file.
func (e *env) readLog(i int) []audit.Entry {
	e.t.Helper()
	f, err := os.Open(filepath.Join(e.brokers[i].dir, "audit.log"))
	if err != nil {
		e.t.Fatal(err)
	}
	defer f.Close()
	entries, err := audit.Read(f)
	if err != nil {
		e.t.Fatal(err)
	}
	return entries
}

// rewriteState does what an admin with write access to stopped broker i's
// state folder can: write entries as the audit file, the chain recomputed
// with the audit package's own Chain, and store its head in the broker's
// database, so that the broker starts on it.
func (e *env) rewriteState(i int, entries []audit.Entry) {
	e.t.Helper()
	dir := e.brokers[i].dir
	head := audit.Chain(entries)
	var buf bytes.Buffer
	for _, en := range entries {
		b, _ := json.Marshal(en)
		buf.Write(append(b, '\n'))
	}
	if err := os.WriteFile(filepath.Join(dir, "audit.log"), buf.Bytes(), 0o600); err != nil {
		e.t.Fatal(err)
	}
	db, err := bolt.Open(filepath.Join(dir, "broker.db"), 0o600, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bolt.Tx) error {
		b, _ := json.Marshal(head)
		return tx.Bucket([]byte("meta")).Put([]byte("audit-head"), b)
	})
	if err != nil {
		e.t.Fatal(err)
	}
}

// TestAuditHeadsCatchRewrites: `embassyctl audit verify` records every
// broker's signed audit head; after the broker's files are rewritten
// (database and log together, chain recomputed), truncated, or the head is
// signed with another key, it names the broker and what differs, fails,
// and leaves the heads file as it was.
func TestAuditHeadsCatchRewrites(t *testing.T) {
	tests := []struct {
		name   string
		tamper func(e *env)
		status opclient.AuditStatus
		seq    uint64 // the entry the verdict names
		detail string
	}{
		{"entry before the last verified head rewritten, chain recomputed", func(e *env) {
			entries := e.readLog(0)
			entries[4].Result, entries[4].Reason = "fail", "never approved" // approve-image 4
			e.rewriteState(0, entries)
		}, opclient.AuditRewritten, 6, "one of entries 5-6 was rewritten"},
		{"first entry rewritten, chain recomputed", func(e *env) {
			entries := e.readLog(0)
			entries[0].Detail["version"] = "9"
			e.rewriteState(0, entries)
		}, opclient.AuditRewritten, 4, "one of entries 1-4 was rewritten"},
		{"log truncated", func(e *env) {
			e.rewriteState(0, e.readLog(0)[:3])
		}, opclient.AuditRolledBack, 4, "the log ends at entry 3, entry 4 was verified"},
		{"log truncated after the last verified head", func(e *env) {
			e.rewriteState(0, e.readLog(0)[:6]) // entry 7 was never verified
		}, opclient.AuditOK, 0, ""},
		{"head signed with another key", func(e *env) {
			_, e.brokers[0].cfg.AuditKey, _ = ed25519.GenerateKey(rand.Reader)
		}, opclient.AuditBadSignature, 0, "does not verify under the pinned key"},
		{"head unsigned", func(e *env) {
			e.brokers[0].cfg.AuditKey = nil
		}, opclient.AuditBadSignature, 0, "no signed head"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, 2, 2)
			c := newCtl(t, e)
			d := tpmtest.NewBootDigests("image-1")
			for v := uint64(1); v <= 3; v++ {
				e.approveImage(v, d)
			}
			for i := range e.brokers { // refused, and audited too
				if err := e.op(i, http.MethodPost, api.PathAppliances+strings.Repeat("0", 32)+"/revoke", struct{}{}, nil); err == nil {
					t.Fatal("an unknown appliance was revoked")
				}
			}

			// (a) The first check passes and records both heads; so
			// does a later one, after more entries.
			out, err := c.run(t, "audit", "verify")
			if err != nil {
				t.Fatalf("first verify: %v\n%s", err, out)
			}
			for _, want := range []string{"broker-a     ok: 4 entries, signed head 4", "broker-b     ok: 4 entries", "signed heads recorded in"} {
				if !strings.Contains(out, want) {
					t.Fatalf("verify output lacks %q:\n%s", want, out)
				}
			}
			heads := filepath.Join(c.dir, embassyctl.HeadsFile) // the default: next to the broker list
			e.approveImage(4, d)
			e.approveImage(5, d)
			vs, err := c.verdicts(t, heads)
			if err != nil || len(vs) != 2 || !vs[0].OK() || !vs[1].OK() || vs[0].Head.Seq != 6 {
				t.Fatalf("second verify: %v %+v", err, vs)
			}
			h, err := opclient.LoadHeads(heads)
			if err != nil {
				t.Fatal(err)
			}
			if got := h.Brokers["broker-a"]; len(got) != 2 || got[0].Seq != 4 || got[1].Seq != 6 {
				t.Fatalf("recorded heads of broker-a: %+v", got)
			}
			saved, _ := os.ReadFile(heads)
			m, sig := e.signManifest(6, d, e.imageKey) // broker-a's entry 7, not verified yet
			if err := e.op(0, http.MethodPost, api.PathManifests, api.ApproveManifestRequest{Manifest: m, Signature: sig}, nil); err != nil {
				t.Fatal(err)
			}

			e.stop(0)
			tc.tamper(e)
			e.start(0)
			// The chain alone does not tell: the broker serves a log
			// that verifies against the head it reports.
			if out, err := c.run(t, "audit", "show"); err != nil {
				t.Fatalf("audit show on the recomputed chain: %v\n%s", err, out)
			}

			vs, err = c.verdicts(t, heads)
			if tc.status == opclient.AuditOK && err != nil || tc.status != opclient.AuditOK && !errors.Is(err, embassyctl.ErrAuditFailed) {
				t.Fatalf("verify after tampering: %v", err)
			}
			if v := vs[0]; v.Broker != "broker-a" || v.Status != tc.status || v.Seq != tc.seq || !strings.Contains(v.Detail, tc.detail) {
				t.Fatalf("broker-a verdict %+v, want %s at %d (%q)", v, tc.status, tc.seq, tc.detail)
			}
			if !vs[1].OK() {
				t.Fatalf("broker-b verdict %+v", vs[1])
			}
			if now, _ := os.ReadFile(heads); !bytes.Equal(now, saved) {
				t.Fatal("the check changed the heads file")
			}
			out, _ = c.run(t, "audit", "verify", "--heads", heads)
			if !strings.Contains(out, "broker-a     "+string(tc.status)+": ") {
				t.Fatalf("human output lacks the verdict:\n%s", out)
			}
		})
	}
}

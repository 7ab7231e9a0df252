package broker_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/operator/opclient"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// syncBuf is a log sink brokers write to from several goroutines.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// records returns the JSON log records with message msg.
func (s *syncBuf) records(msg string) []map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []map[string]any
	for _, line := range strings.Split(s.b.String(), "\n") {
		var r map[string]any
		if json.Unmarshal([]byte(line), &r) == nil && r["msg"] == msg {
			out = append(out, r)
		}
	}
	return out
}

// custodians is an env whose brokers each trust only their own custodian
// CA, with one custodian each (custodian[i] at broker i).
type custodians struct {
	*env
	ca        []*pki.Issuer
	custodian []tls.Certificate
	logs      []*syncBuf
}

// newCustodianEnv starts n brokers (k of n) and gives each its own
// custodian CA and a first custodian named names[i].
func newCustodianEnv(t *testing.T, k int, names ...string) *custodians {
	t.Helper()
	c := &custodians{env: newEnv(t, len(names), k)}
	for i, rb := range c.brokers {
		ca, err := pki.NewRootCA(rb.name+" custodian CA", 24*time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		c.stop(i)
		buf := &syncBuf{}
		rb.cfg.Custodians, rb.cfg.Log = ca.Pool(), slog.New(slog.NewJSONHandler(buf, nil))
		c.start(i)
		c.ca, c.logs = append(c.ca, ca), append(c.logs, buf)
		c.custodian = append(c.custodian, c.issue(i, names[i]))
	}
	return c
}

// issue makes a custodian certificate from broker i's custodian CA.
func (c *custodians) issue(i int, name string) tls.Certificate {
	c.t.Helper()
	key, _ := pki.NewKey()
	leaf, err := c.ca[i].Leaf(name, nil, &key.PublicKey, time.Hour)
	if err != nil {
		c.t.Fatal(err)
	}
	return pki.TLSCertificate(leaf, key)
}

// own sends the same request to every broker, each with its own custodian.
func (c *custodians) own(method, path string, body any) {
	c.t.Helper()
	for i := range c.brokers {
		if err := c.opAs(c.custodian[i], i, method, path, body, nil); err != nil {
			c.t.Fatalf("%s %s on %s: %v", method, path, c.brokers[i].name, err)
		}
	}
}

// auditOf reads broker i's audit log with its own custodian.
func (c *custodians) auditOf(i int) []audit.Entry {
	c.t.Helper()
	var ar audit.Response
	if err := c.opAs(c.custodian[i], i, http.MethodGet, api.PathAudit, nil, &ar); err != nil {
		c.t.Fatal(err)
	}
	return ar.Entries
}

// releases counts the share releases in every broker's audit log.
func (c *custodians) releases() []int {
	c.t.Helper()
	out := make([]int, len(c.brokers))
	for i := range c.brokers {
		for _, e := range c.auditOf(i) {
			if e.Event == "release" && e.Result == "ok" {
				out[i]++
			}
		}
	}
	return out
}

func fingerprint(cert tls.Certificate) string {
	sum := sha256.Sum256(cert.Certificate[0])
	return hex.EncodeToString(sum[:])
}

// TestOneCustodianCannotReleaseAlone is the attack from a custodian's side:
// alice, custodian of broker-a, approves a new image at broker-a and tries
// broker-b and broker-c with the same credential. They refuse her (401
// unauthenticated, before any route runs) and log it; the appliance booting her image gets a share
// from broker-a only, which is below k=2, so its disks stay locked and no
// other broker released anything. Once bob, custodian of broker-b,
// approves the image too, the appliance gets k shares.
func TestOneCustodianCannotReleaseAlone(t *testing.T) {
	c := newCustodianEnv(t, 2, "alice", "bob", "carol")
	alice := c.custodian[0]
	ctx := context.Background()

	// Provisioning: every broker's own custodian enrolls the appliance and
	// approves image 1 and a disk; the appliance deposits a disk key.
	d1 := tpmtest.NewBootDigests("image-1")
	a := c.boot(1, d1, attester.EKRSA)
	defer a.shutdown()
	if err := a.c.Enroll(ctx); err != nil {
		t.Fatal(err)
	}
	id := a.c.ID()
	c.own(http.MethodPost, api.PathEnrollments+"/"+id+"/approve", struct{}{})
	m1, s1 := c.signManifest(1, d1, c.imageKey)
	c.own(http.MethodPost, api.PathManifests, api.ApproveManifestRequest{Manifest: m1, Signature: s1})
	c.own(http.MethodPost, api.PathAppliances+id+"/disks", api.DiskApprovalRequest{Count: 1})
	results, err := a.c.AttestAll(ctxTimeout(t, time.Minute), fastRetry, 3)
	if err != nil {
		t.Fatal(err)
	}
	secret := bytes.Repeat([]byte{7}, 32)
	if err := a.c.Deposit(ctx, results, "disk-1", secret); err != nil {
		t.Fatal(err)
	}

	// The attack: alice approves image 2 with her broker-a credential
	// at every broker, as embassyctl would.
	d2 := tpmtest.NewBootDigests("image-2")
	m2, s2 := c.signManifest(2, d2, c.imageKey)
	var list []opclient.Broker
	var creds []opclient.Credential
	for _, rb := range c.brokers {
		list = append(list, opclient.Broker{Name: rb.name, URL: "https://" + rb.opLn.Addr().String()})
		creds = append(creds, opclient.Credential{Cert: alice, Roots: c.rootPool()})
	}
	oc, err := opclient.NewPerBroker(list, creds)
	if err != nil {
		t.Fatal(err)
	}
	outs, err := oc.ApproveImage(ctx, m2, s2)
	if !errors.Is(err, opclient.ErrCredentialRefused) {
		t.Fatalf("alice's approval everywhere: %v, want ErrCredentialRefused", err)
	}
	for i, o := range outs {
		if want := i == 0; o.OK != want || (!want && o.Code != api.CodeUnauthenticated) {
			t.Errorf("alice at %s: %+v", o.Broker, o)
		}
	}
	before := c.releases()
	for i := 1; i < 3; i++ {
		// Refused before any route ran: nothing approved, nothing audited
		// in alice's name; the broker logged the refusal.
		var st api.State
		if err := c.opAs(c.custodian[i], i, http.MethodGet, api.PathState, nil, &st); err != nil {
			t.Fatal(err)
		}
		if len(st.Manifests) != 1 || st.Manifests[0].Version != 1 {
			t.Errorf("%s approved images %+v after alice's attempt", c.brokers[i].name, st.Manifests)
		}
		for _, e := range c.auditOf(i) {
			if e.Actor != nil && e.Actor.Fingerprint == fingerprint(alice) {
				t.Errorf("%s audited an act by alice: %+v", c.brokers[i].name, e)
			}
		}
		refused := c.logs[i].records(broker.MsgCustodianRefused)
		if len(refused) == 0 || refused[0]["subject"] != "CN=alice" || refused[0]["fingerprint"] != fingerprint(alice) ||
			refused[0]["issuer"] != "CN=broker-a custodian CA" {
			t.Errorf("%s logged the refusals %v", c.brokers[i].name, refused)
		}
	}

	// The appliance boots alice's image: broker-a releases, the others
	// refuse it as unapproved, and one share recombines nothing.
	a.reboot(t, d2)
	results, _, err = a.c.AttestFirst(ctxTimeout(t, 3*time.Second), fastRetry, 2)
	if !errors.Is(err, attest.ErrBelowThreshold) || len(results) != 1 || results[0].Broker != "broker-a" {
		t.Fatalf("boot of image 2 approved by alice alone: %v, %d results", err, len(results))
	}
	if keys, _ := attest.Round(results).Keys(2); len(keys) != 0 {
		t.Fatal("a disk key was recombined from broker-a's share alone")
	}
	after := c.releases()
	if after[0] != before[0]+1 || after[1] != before[1] || after[2] != before[2] {
		t.Fatalf("releases per broker went from %v to %v, want one more at broker-a only", before, after)
	}
	for i := 1; i < 3; i++ {
		var last audit.Entry
		for _, e := range c.auditOf(i) {
			if e.Event == "attest" {
				last = e
			}
		}
		if last.Result != "fail" || last.Reason != broker.ReasonImage {
			t.Errorf("%s's last attestation %+v, want refused as %q", c.brokers[i].name, last, broker.ReasonImage)
		}
	}

	// A second custodian, of another broker, approves: now k brokers
	// release and the key recombines.
	if err := c.opAs(c.custodian[1], 1, http.MethodPost, api.PathManifests, api.ApproveManifestRequest{Manifest: m2, Signature: s2}, nil); err != nil {
		t.Fatal(err)
	}
	results, _, err = a.c.AttestFirst(ctxTimeout(t, time.Minute), fastRetry, 2)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := attest.Round(results).Keys(2)
	if err != nil || !bytes.Equal(keys["disk-1"], secret) {
		t.Fatalf("image 2 approved at broker-a and broker-b: keys %v, %v", keys, err)
	}
	if final := c.releases(); final[2] != before[2] {
		t.Fatalf("broker-c released for image 2, which its custodians never approved: %v", final)
	}
}

// TestCustodianAdmission: broker-a's operator API admits its own custodians
// and refuses (401 unauthenticated, logged) every other client certificate: another
// broker's custodian, the shared home-state operator CA's, a revoked
// custodian's and a self-signed one.
func TestCustodianAdmission(t *testing.T) {
	c := newCustodianEnv(t, 1, "alice", "bob")
	dave := c.issue(0, "dave")
	mallory := c.issue(0, "mallory")
	c.brokers[0].b.SetRevokedCustodians(map[string]bool{fingerprint(mallory): true}, nil)
	self, err := pki.NewRootCA("alice", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	selfKey, _ := pki.NewKey()
	selfLeaf, err := self.Leaf("alice", nil, &selfKey.PublicKey, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		cert  tls.Certificate
		admit bool
	}{
		{"broker-a's first custodian", c.custodian[0], true},
		{"a second custodian of broker-a", dave, true},
		{"broker-b's custodian", c.custodian[1], false},
		{"the shared operator CA's operator", c.opCert, false},
		{"a revoked custodian of broker-a", mallory, false},
		{"a self-signed certificate named alice", pki.TLSCertificate(selfLeaf, selfKey), false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			n := len(c.logs[0].records(broker.MsgCustodianRefused))
			err := c.opAs(tc.cert, 0, http.MethodGet, api.PathState, nil, &api.State{})
			if !tc.admit && codeOf(err) != api.CodeUnauthenticated {
				t.Fatalf("refused with %v (code %q), want code %q", err, codeOf(err), api.CodeUnauthenticated)
			}
			if (err == nil) != tc.admit {
				t.Fatalf("admitted %v (err %v), want %v", err == nil, err, tc.admit)
			}
			refused := c.logs[0].records(broker.MsgCustodianRefused)
			if tc.admit != (len(refused) == n) {
				t.Fatalf("refusals logged: %d, then %d", n, len(refused))
			}
			if !tc.admit && refused[n]["fingerprint"] != fingerprint(tc.cert) {
				t.Fatalf("refusal log %v", refused[n])
			}
		})
	}
}

// TestCustodianRevokedWhileServing: a custodian revoked while the broker
// serves is refused at the next request, without a restart; a revocation
// list that cannot be read refuses every custodian until it can.
func TestCustodianRevokedWhileServing(t *testing.T) {
	c := newCustodianEnv(t, 1, "alice")
	dave := c.issue(0, "dave")
	b := c.brokers[0].b
	admitted := func(cert tls.Certificate) bool {
		return c.opAs(cert, 0, http.MethodGet, api.PathState, nil, &api.State{}) == nil
	}
	steps := []struct {
		name        string
		revoked     map[string]bool
		readErr     error
		alice, dave bool
	}{
		{"before", nil, nil, true, true},
		{"dave revoked", map[string]bool{fingerprint(dave): true}, nil, true, false},
		{"list unreadable: no one", map[string]bool{fingerprint(dave): true}, errors.New("line 3: not a fingerprint"), false, false},
		{"list readable again", map[string]bool{strings.ToUpper(fingerprint(dave)): true}, nil, true, false},
	}
	for _, st := range steps {
		if st.name != "before" {
			b.SetRevokedCustodians(st.revoked, st.readErr)
		}
		if got := admitted(c.custodian[0]); got != st.alice {
			t.Errorf("%s: alice admitted %v, want %v", st.name, got, st.alice)
		}
		if got := admitted(dave); got != st.dave {
			t.Errorf("%s: dave admitted %v, want %v", st.name, got, st.dave)
		}
	}
}

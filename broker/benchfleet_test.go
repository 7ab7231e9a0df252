package broker_test

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/broker/hsm"
	"github.com/dataembassy/embassy/broker/hsm/hsmtest"
	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// forEachKey runs a broker benchmark once per master-key backend, as the
// sub-benchmarks key=file (seal.FileKey) and key=softhsm2 (hsm.Sealer, a
// non-extractable AES key in a fresh SoftHSM2 token; skipped when
// SoftHSM2 is not installed or without cgo).
func forEachKey(b *testing.B, run func(b *testing.B, key string)) {
	for _, key := range []string{"file", "softhsm2"} {
		b.Run("key="+key, func(b *testing.B) { run(b, key) })
	}
}

// benchEnv makes one broker whose master key is of backend key, with an
// hour's nonce lifetime (the fleet's evidence is made before the rounds).
func benchEnv(b *testing.B, key string) *env {
	b.Helper()
	e := newEnv(b, 1, 1)
	e.brokers[0].cfg.NonceTTL = time.Hour
	switch key {
	case "file":
		e.stop(0)
		e.start(0)
	case "softhsm2":
		cfg := hsmtest.Token(b, "broker-a", "master")
		if err := hsm.GenerateKey(cfg); errors.Is(err, hsm.ErrNoCgo) {
			b.Skip(err)
		} else if err != nil {
			b.Fatal(err)
		}
		s := e.useHSM(0, cfg)
		b.Cleanup(func() { e.stop(0); s.Close() })
	default:
		b.Fatalf("unknown master-key backend %q", key)
	}
	return e
}

// useHSM restarts broker i with its master key in the SoftHSM2 token of
// cfg: a new PKCS#11 module load, session and login, and a new broker.New.
func (e *env) useHSM(i int, cfg hsm.Config) *hsm.Sealer {
	e.t.Helper()
	e.stop(i)
	s, err := hsm.Open(cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	e.brokers[i].cfg.Sealer, e.brokers[i].cfg.MasterKey = s, nil
	e.start(i)
	return s
}

// batch names one measured round of one benchmark at one concurrency
// level; kind tells the benchmarks apart.
type batch struct {
	kind        string
	conc, round int
}

// fleet is the broker benchmark's appliances: appliance i is a machine of
// its own, a TPM simulator with seed i+1 (so its own EK and AK), measured
// boot of the approved image, enrolled, activated and approved on broker
// 0, with one disk approved and its share deposited, so that every
// attestation seals a share to that appliance's EK.
//
// go-tpm-tools' simulator is one C library instance per process (package
// state, and simulator.Get blocks while another simulator is open), so the
// appliances cannot hold live TPMs at the same time. Each one is therefore
// set up in turn: its simulator opened, the machine enrolled and its
// share deposited, the attest requests of every batch it takes part in
// made (a broker nonce each, quoted by its own TPM), and the simulator
// closed before the next machine's is opened. The broker only ever sees
// the evidence, so that is all the measured rounds need. Holding that
// many nonces per appliance needs broker.SetNoncesPerAppliance.
type fleet struct {
	ids []string
	// evidence[i][batch] are appliance i's attest request bodies for that
	// batch, in the order its worker sends them.
	evidence []map[batch][][]byte
	// akPublic and ekPublic are appliance i's AK (TPM2B public) and EK
	// (PKIX), for the in-process benchmark's baseline.
	akPublic, ekPublic [][]byte
}

// newFleet sets up as many appliances as the largest batch's concurrency,
// for image d. plan gives each batch's requests per worker; appliance i
// takes part in the batches whose concurrency is above i.
func newFleet(tb testing.TB, e *env, d tpmtest.BootDigests, plan map[batch]int) *fleet {
	tb.Helper()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.rootPool()}}}
	defer hc.CloseIdleConnections()
	nonceURL := e.cfg.Brokers[0].Endpoints[0] + api.PathNonce
	n, most := 0, 0
	for bt, per := range plan {
		n = max(n, bt.conc)
		most += per // appliance 0 takes part in every batch
	}
	broker.SetNoncesPerAppliance(e.brokers[0].b, most)
	f := &fleet{}
	for i := range n {
		a := e.boot(int64(i+1), d, attester.EKRSA)
		id := a.c.ID()
		if slices.Contains(f.ids, id) {
			tb.Fatalf("appliance %d has the id of an earlier one (%s): the TPMs are not distinct", i, id)
		}
		enrollWithShare(tb, e, a)
		ev := map[batch][][]byte{}
		for bt, per := range plan {
			if i >= bt.conc {
				continue
			}
			bodies := make([][]byte, per)
			for k := range bodies {
				var n api.NonceResponse
				if err := do(hc, http.MethodPost, nonceURL, api.NonceRequest{ApplianceID: id}, &n); err != nil {
					tb.Fatal(err)
				}
				var err error
				if bodies[k], err = json.Marshal(quoteRequest(tb, a, id, n.Nonce)); err != nil {
					tb.Fatal(err)
				}
			}
			ev[bt] = bodies
		}
		ak, err := a.tpm.AKPublic()
		if err != nil {
			tb.Fatal(err)
		}
		ek, err := x509.MarshalPKIXPublicKey(a.tpm.EKPublic())
		if err != nil {
			tb.Fatal(err)
		}
		a.shutdown() // frees the process's one simulator for the next machine
		f.ids = append(f.ids, id)
		f.evidence = append(f.evidence, ev)
		f.akPublic, f.ekPublic = append(f.akPublic, ak), append(f.ekPublic, ek)
	}
	return f
}

// enrollWithShare enrolls a on every broker (activation and the operators'
// approval), approves one disk, attests and deposits a share for it.
func enrollWithShare(tb testing.TB, e *env, a *appliance) {
	tb.Helper()
	e.enroll(a)
	e.opAll(http.MethodPost, api.PathAppliances+a.c.ID()+"/disks", api.DiskApprovalRequest{Count: 1})
	results, err := a.c.AttestAll(ctxTimeout(tb, time.Minute), fastRetry, len(e.brokers))
	if err != nil {
		tb.Fatal(err)
	}
	secret := make([]byte, 32)
	rand.Read(secret)
	defer clear(secret)
	if err := a.c.Deposit(ctxTimeout(tb, time.Minute), results, "disk-1", secret); err != nil {
		tb.Fatal(err)
	}
}

// work returns the request bodies of one batch: element w is what worker w
// sends, all from appliance w.
func (f *fleet) work(bt batch) [][][]byte {
	out := make([][][]byte, bt.conc)
	for w := range out {
		out[w] = f.evidence[w][bt]
	}
	return out
}

// auditedSince returns, per appliance, the successful releases and the
// failed attestations broker 0 audited after sequence number seq, and the
// audit log's head.
func auditedSince(tb testing.TB, e *env, seq uint64) (releases, failures map[string]int, head uint64) {
	tb.Helper()
	var ar audit.Response
	if err := e.op(0, http.MethodGet, api.PathAudit, nil, &ar); err != nil {
		tb.Fatal(err)
	}
	releases, failures = map[string]int{}, map[string]int{}
	for _, en := range ar.Entries {
		switch {
		case en.Seq <= seq:
		case en.Event == "release" && en.Result == "ok":
			releases[en.Appliance]++
		case en.Event == "attest" && en.Result != "ok":
			failures[en.Appliance]++
		}
	}
	return releases, failures, ar.Head.Seq
}

// useHSMCA restarts broker i with its root CA and service CA keys
// generated in the token of cfg (labels KeyLabel-root-ca and
// KeyLabel-service-ca, as keybroker init makes them): a new root, TLS
// certificate and service CA. Call it before booting appliances (they pin
// the root). The returned function releases the token.
func (e *env) useHSMCA(i int, cfg hsm.Config) func() {
	e.t.Helper()
	rb := e.brokers[i]
	e.stop(i)
	open := func(label string) *hsm.Signer {
		c := cfg
		c.KeyLabel = label
		if _, err := hsm.GenerateSigningKey(c); err != nil {
			e.t.Fatal(err)
		}
		s, err := hsm.OpenSigner(c)
		if err != nil {
			e.t.Fatal(err)
		}
		return s
	}
	rootKey, svcKey := open(cfg.KeyLabel+"-root-ca"), open(cfg.KeyLabel+"-service-ca")
	var err error
	if rb.root, err = pki.RootCA(rb.name+" root CA", 24*time.Hour, rootKey); err != nil {
		e.t.Fatal(err)
	}
	if rb.cfg.ServiceCA, err = rb.root.Intermediate(rb.name+" service CA", 24*time.Hour, svcKey); err != nil {
		e.t.Fatal(err)
	}
	srvKey, _ := pki.NewKey()
	srvLeaf, err := rb.root.Leaf(rb.name, []string{"127.0.0.1"}, &srvKey.PublicKey, 24*time.Hour)
	if err != nil {
		e.t.Fatal(err)
	}
	rb.serverCert = pki.TLSCertificate(srvLeaf, srvKey)
	e.start(i)
	return func() { rootKey.Close(); svcKey.Close() }
}

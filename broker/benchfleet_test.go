package broker_test

import (
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/tpmtest"
)

// batch names one measured round at one concurrency level.
type batch struct{ conc, round int }

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
// the evidence, so that is all the measured rounds need.
type fleet struct {
	ids []string
	// evidence[i][batch] are appliance i's attest request bodies for that
	// batch, in the order its worker sends them.
	evidence []map[batch][][]byte
}

// newFleet sets up max(levels) appliances for the given image. Appliance i
// takes part at every level above i, with perWorker(level) requests per
// round.
func newFleet(tb testing.TB, e *env, d tpmtest.BootDigests, levels []int, rounds int, perWorker func(conc int) int) *fleet {
	tb.Helper()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.rootPool()}}}
	defer hc.CloseIdleConnections()
	nonceURL := e.cfg.Brokers[0].Endpoints[0] + api.PathNonce
	f := &fleet{}
	for i := range slices.Max(levels) {
		a := e.boot(int64(i+1), d, attester.EKRSA)
		id := a.c.ID()
		if slices.Contains(f.ids, id) {
			tb.Fatalf("appliance %d has the id of an earlier one (%s): the TPMs are not distinct", i, id)
		}
		enrollWithShare(tb, e, a)
		ev := map[batch][][]byte{}
		for _, conc := range levels {
			if i >= conc {
				continue
			}
			for r := range rounds {
				bodies := make([][]byte, perWorker(conc))
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
				ev[batch{conc, r}] = bodies
			}
		}
		a.shutdown() // frees the process's one simulator for the next machine
		f.ids = append(f.ids, id)
		f.evidence = append(f.evidence, ev)
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

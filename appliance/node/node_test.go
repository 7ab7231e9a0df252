package node

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/appliance/attest/attesttest"
	"github.com/dataembassy/embassy/appliance/replicate"
	"github.com/dataembassy/embassy/protocol/api"
)

const applianceID = "appliance-under-test"

// fakeAttester answers challenges with the nonce it was given and
// re-attestations with the rounds queued in rounds (an error ends them).
type fakeAttester struct {
	rounds chan fakeRound
}

type fakeRound struct {
	res []*attest.Result
	err error
}

func (f *fakeAttester) ID() string { return applianceID }

func (f *fakeAttester) AttestAll(ctx context.Context, bo attest.Backoff, want int) ([]*attest.Result, error) {
	select {
	case r := <-f.rounds:
		return r.res, r.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (f *fakeAttester) Challenge(nonce []byte) (*api.ChallengeResponse, error) {
	if len(nonce) < 16 {
		return nil, fmt.Errorf("nonce of %d bytes; want 16 to 64", len(nonce))
	}
	return &api.ChallengeResponse{ApplianceID: applianceID, Quote: nonce}, nil
}

// named answers every request with its name and the path it saw.
func named(name string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s", name, r.URL.Path)
	})
}

func newNode(health *api.Health, att *fakeAttester) (*Node, *atomic.Pointer[tls.Certificate]) {
	var cert atomic.Pointer[tls.Certificate]
	n := New(Deps{
		Log:         slog.New(slog.NewTextHandler(io.Discard, nil)),
		Attester:    att,
		Health:      HealthFunc(func() *api.Health { return health }),
		Ingest:      named("ingest"),
		Replication: named("replication"),
		Metrics: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/plain; version=0.0.4")
			io.WriteString(w, "embassy_objects_total 3\n")
		}),
		Cert:      &cert,
		Threshold: 2,
		Monitor: func(r *http.Request) error {
			if r.Header.Get("X-Test-Monitor") != "yes" {
				return errors.New("not a monitor")
			}
			return nil
		},
	})
	return n, &cert
}

func TestHandler(t *testing.T) {
	healthy := &api.Health{Disks: []api.DiskHealth{{Serial: "S1", Device: "vdb", UUID: "u1", State: "healthy"}},
		Peers: []api.PeerHealth{{ID: "peer", PendingObjects: 2}}}
	degraded := &api.Health{Degraded: true, Disks: []api.DiskHealth{{Serial: "S1", State: "failed", Reason: "disk removed"}},
		BlankDisks: []api.DiskHealth{{Serial: "S2", Device: "vdc", State: "blank, waiting for approval"}}}
	nonce := strings.Repeat("n", 16)
	goodChallenge, err := json.Marshal(api.ChallengeRequest{Nonce: []byte(nonce)})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name       string
		health     *api.Health
		method     string
		target     string
		body       string
		wantStatus int
		wantType   string
		check      func(t *testing.T, body string)
		anonymous  bool // no monitoring identity
	}{
		{name: "health", health: healthy, method: "GET", target: PathHealth, wantStatus: 200, wantType: "application/json",
			check: func(t *testing.T, body string) {
				var h Health
				if err := json.Unmarshal([]byte(body), &h); err != nil {
					t.Fatal(err)
				}
				if h.ApplianceID != applianceID || h.Degraded || len(h.Disks) != 1 || h.Disks[0].Serial != "S1" ||
					len(h.Peers) != 1 || h.Peers[0].PendingObjects != 2 || h.BlankDisks != nil {
					t.Fatalf("health %+v", h)
				}
			}},
		{name: "health while degraded", health: degraded, method: "GET", target: PathHealth, wantStatus: 503, wantType: "application/json",
			check: func(t *testing.T, body string) {
				var fields map[string]json.RawMessage
				if err := json.Unmarshal([]byte(body), &fields); err != nil {
					t.Fatal(err)
				}
				for _, f := range []string{"appliance_id", "degraded", "disks", "blank_disks", "peers"} {
					if _, ok := fields[f]; !ok {
						t.Fatalf("no field %q in %s", f, body)
					}
				}
				if len(fields) != 5 || string(fields["degraded"]) != "true" || string(fields["peers"]) != "null" ||
					!strings.Contains(string(fields["blank_disks"]), `"serial":"S2"`) {
					t.Fatalf("health %s", body)
				}
			}},
		{name: "metrics from the handler given", health: healthy, method: "GET", target: PathMetrics, wantStatus: 200,
			wantType: "text/plain; version=0.0.4",
			check: func(t *testing.T, body string) {
				if body != "embassy_objects_total 3\n" {
					t.Fatalf("metrics %q", body)
				}
			}},
		{name: "health without a monitoring identity", health: healthy, method: "GET", target: PathHealth, wantStatus: 401, anonymous: true},
		{name: "metrics without a monitoring identity", health: healthy, method: "GET", target: PathMetrics, wantStatus: 401, anonymous: true,
			check: func(t *testing.T, body string) {
				if strings.Contains(body, "embassy_") {
					t.Fatalf("metrics leaked: %q", body)
				}
			}},
		{name: "challenge needs POST", method: "GET", target: api.PathChallenge, wantStatus: 405},
		{name: "challenge with bad JSON", method: "POST", target: api.PathChallenge, body: `{"nonce":`, wantStatus: 400},
		{name: "challenge with an unknown field", method: "POST", target: api.PathChallenge, body: `{"nonce":"","x":1}`, wantStatus: 400},
		{name: "challenge refused by the attester", method: "POST", target: api.PathChallenge, body: `{"nonce":"c2hvcnQ="}`, wantStatus: 400,
			check: func(t *testing.T, body string) {
				if !strings.Contains(body, "nonce of 5 bytes") {
					t.Fatalf("answer %q", body)
				}
			}},
		{name: "challenge answered", method: "POST", target: api.PathChallenge, body: string(goodChallenge), wantStatus: 200, wantType: "application/json",
			check: func(t *testing.T, body string) {
				var resp api.ChallengeResponse
				if err := json.Unmarshal([]byte(body), &resp); err != nil {
					t.Fatal(err)
				}
				if resp.ApplianceID != applianceID || string(resp.Quote) != nonce {
					t.Fatalf("answer %+v", resp)
				}
			}},
		{name: "replication prefix", method: "GET", target: replicate.PathPing, wantStatus: 200,
			check: func(t *testing.T, body string) {
				if body != "replication "+replicate.PathPing {
					t.Fatalf("answer %q", body)
				}
			}},
		{name: "restic path to ingest", method: "GET", target: "/repo/config", wantStatus: 200,
			check: func(t *testing.T, body string) {
				if body != "ingest /repo/config" {
					t.Fatalf("answer %q", body)
				}
			}},
		{name: "traversal path reaches ingest uncleaned", method: "GET", target: "/repo/../x", wantStatus: 200,
			check: func(t *testing.T, body string) {
				if body != "ingest /repo/../x" {
					t.Fatalf("answer %q", body)
				}
			}},
		{name: "traversal out of the replication prefix reaches ingest", method: "GET", target: "/_embassy/replica/../health", wantStatus: 200,
			check: func(t *testing.T, body string) {
				if body != "ingest /_embassy/replica/../health" {
					t.Fatalf("answer %q", body)
				}
			}},
		{name: "own path with a suffix reaches ingest", method: "GET", target: PathHealth + "/", wantStatus: 200,
			check: func(t *testing.T, body string) {
				if body != "ingest "+PathHealth+"/" {
					t.Fatalf("answer %q", body)
				}
			}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			n, _ := newNode(tc.health, &fakeAttester{})
			rec := httptest.NewRecorder()
			req := httptest.NewRequest(tc.method, tc.target, strings.NewReader(tc.body))
			if !tc.anonymous {
				req.Header.Set("X-Test-Monitor", "yes")
			}
			n.Handler().ServeHTTP(rec, req)
			if rec.Code != tc.wantStatus {
				t.Fatalf("status %d, want %d: %s", rec.Code, tc.wantStatus, rec.Body)
			}
			if tc.wantType != "" && rec.Header().Get("Content-Type") != tc.wantType {
				t.Fatalf("content type %q, want %q", rec.Header().Get("Content-Type"), tc.wantType)
			}
			if tc.check != nil {
				tc.check(t, rec.Body.String())
			}
		})
	}
}

func TestRun(t *testing.T) {
	first := &tls.Certificate{Certificate: [][]byte{[]byte("boot round")}}
	// Each broker's certificate for the same key; the re-attestation's
	// served certificate carries both (a peer needs k brokers' word).
	fromB1 := &tls.Certificate{Certificate: [][]byte{[]byte("b1 leaf"), []byte("b1 CA")}}
	fromB2 := &tls.Certificate{Certificate: [][]byte{[]byte("b2 leaf"), []byte("b2 CA")}}
	second := [][]byte{[]byte("b1 leaf"), []byte("b1 CA"), []byte("b2 leaf"), []byte("b2 CA")}
	ok := []*attest.Result{{Broker: "b1", Certificate: fromB1, DiskApprovals: 1}, {Broker: "b2", Certificate: fromB2, DiskApprovals: 2}}
	lockdown := &attest.LockdownError{Broker: "b1", Reason: "appliance revoked"}
	cases := []struct {
		name       string
		rounds     []fakeRound
		cancel     bool
		want       Reason
		wantCause  error
		reattested int
	}{
		{name: "lockdown after a good round", rounds: []fakeRound{{res: ok}, {err: lockdown}}, want: ReasonLockdown, wantCause: lockdown, reattested: 1},
		{name: "failed re-attestation", rounds: []fakeRound{{err: attest.ErrBelowThreshold}}, want: ReasonReattestFailed, wantCause: attest.ErrBelowThreshold},
		{name: "context done", cancel: true, want: ReasonDone, wantCause: context.Canceled},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			att := &fakeAttester{rounds: make(chan fakeRound, len(tc.rounds))}
			for _, r := range tc.rounds {
				att.rounds <- r
			}
			n, cert := newNode(&api.Health{}, att)
			cert.Store(first)
			n.d.ReattestEvery = time.Millisecond
			n.d.ReattestBounds = attest.ReattestBounds{Min: time.Millisecond, Max: time.Second}
			var rounds []attest.Round
			n.d.Reattested = func(r attest.Round) { rounds = append(rounds, r) }
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if tc.cancel {
				cancel()
			}
			stop := n.Run(ctx)
			if stop == nil || stop.Reason != tc.want || !errors.Is(stop, tc.wantCause) {
				t.Fatalf("stopped with %v, want %s (%v)", stop, tc.want, tc.wantCause)
			}
			var ld *attest.LockdownError
			if tc.want == ReasonLockdown && (!errors.As(stop, &ld) || ld.Reason != "appliance revoked") {
				t.Fatalf("lockdown not reported: %v", stop)
			}
			if len(rounds) != tc.reattested {
				t.Fatalf("%d re-attestations reported, want %d", len(rounds), tc.reattested)
			}
			if tc.reattested == 0 && cert.Load() != first {
				t.Fatal("served certificate replaced without a re-attestation")
			}
			if tc.reattested > 0 && !slices.EqualFunc(cert.Load().Certificate, second, bytes.Equal) {
				t.Fatalf("served certificate %q, want every broker's of the re-attestation %q", cert.Load().Certificate, second)
			}
			if tc.reattested > 0 && rounds[0].DiskApprovals() != 1 {
				t.Fatalf("round %v", rounds[0])
			}
			// The server is closed: nothing answers any more.
			if _, err := n.ln.Accept(); err == nil {
				t.Fatal("listener still open")
			}
		})
	}
}

// timedAttester answers every re-attestation with the same round and
// records when each was asked for; it ends the test's run after want
// rounds.
type timedAttester struct {
	fakeAttester
	answer []*attest.Result
	want   int
	stop   context.CancelFunc
	asked  []time.Time
}

func (f *timedAttester) AttestAll(ctx context.Context, bo attest.Backoff, want int) ([]*attest.Result, error) {
	f.asked = append(f.asked, time.Now())
	if len(f.asked) >= f.want {
		f.stop()
	}
	return f.answer, nil
}

// TestReattestInterval: the intervals the brokers answer are clamped, and
// the smallest of a round's wins: one broker answering ten years does not
// stop re-attestation (the next round comes within the maximum), one
// answering zero or a negative interval does not make it spin (rounds stay
// the minimum apart).
func TestReattestInterval(t *testing.T) {
	const tenYears = 10 * 365 * 24 * time.Hour
	// Timers fire late on a loaded machine, never early: the lower bounds
	// are exact, the upper ones get slack.
	const slack = 2 * time.Second
	short := attest.ReattestBounds{Min: 150 * time.Millisecond, Max: 500 * time.Millisecond}
	long := attest.ReattestBounds{Min: 150 * time.Millisecond, Max: 5 * time.Second}
	res := func(intervals ...time.Duration) []*attest.Result {
		var out []*attest.Result
		for i, d := range intervals {
			out = append(out, &attest.Result{Broker: fmt.Sprintf("b%d", i), Certificate: &tls.Certificate{}, ReattestAfter: d})
		}
		return out
	}
	cases := []struct {
		name    string
		bounds  attest.ReattestBounds
		first   time.Duration // the boot round's interval
		answer  []*attest.Result
		atLeast time.Duration // between two rounds, and before the first
		atMost  time.Duration
	}{
		{"every broker answers ten years", short, tenYears, res(tenYears, tenYears), short.Max, short.Max + slack},
		// The maximum is far: the rounds come at the smallest interval.
		{"one broker answers ten years", long, 200 * time.Millisecond, res(tenYears, 200*time.Millisecond),
			200 * time.Millisecond, 200*time.Millisecond + slack},
		{"a broker answers zero", short, 0, res(0, time.Minute), short.Min, short.Max + slack},
		{"a broker answers a negative interval", short, -time.Second, res(time.Minute, -time.Hour), short.Min, short.Max + slack},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			att := &timedAttester{answer: tc.answer, want: 4, stop: cancel}
			n, _ := newNode(&api.Health{}, &fakeAttester{})
			n.d.Attester = att
			n.d.ReattestEvery = tc.first
			n.d.ReattestBounds = tc.bounds
			start := time.Now()
			if stop := n.Run(ctx); stop.Reason != ReasonDone {
				t.Fatalf("stopped with %v", stop)
			}
			if len(att.asked) < att.want {
				t.Fatalf("re-attestation stopped: %d rounds in %s, want %d", len(att.asked), time.Since(start), att.want)
			}
			if first := att.asked[0].Sub(start); first > tc.bounds.Max+slack {
				t.Fatalf("first round after %s, want at most %s", first, tc.bounds.Max+slack)
			}
			for i := 1; i < len(att.asked); i++ {
				gap := att.asked[i].Sub(att.asked[i-1])
				if gap < tc.atLeast || gap > tc.atMost {
					t.Fatalf("round %d came %s after the one before, want %s to %s", i+1, gap, tc.atLeast, tc.atMost)
				}
			}
		})
	}
}

// TestSlowestBrokerLockdownStops, from the attacker's side: k = 2 brokers
// answer at once and the third only after a delay, over TLS. Whether the
// third's answer comes in a re-attestation or after the boot's unlock
// (which did not wait for it), its lockdown stops the node like a fast
// broker's (ReasonLockdown, *attest.LockdownError); its normal answer
// leaves the node serving.
func TestSlowestBrokerLockdownStops(t *testing.T) {
	cases := []struct {
		name     string
		boot     bool // the answer comes late in the boot round, else in re-attestations
		lockdown bool
		want     Reason
	}{
		{"re-attestation: slowest broker orders a lockdown", false, true, ReasonLockdown},
		{"re-attestation: slowest broker answers", false, false, ReasonDone},
		{"boot: slowest broker orders a lockdown after the unlock", true, true, ReasonLockdown},
		{"boot: slowest broker answers after the unlock", true, false, ReasonDone},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			slow := &attesttest.Broker{Name: "broker-c", Lockdown: tc.lockdown, Delay: 300 * time.Millisecond}
			client := attesttest.NewClient(t, 2, &attesttest.Broker{Name: "broker-a"}, &attesttest.Broker{Name: "broker-b"}, slow)
			n, cert := newNode(&api.Health{}, &fakeAttester{})
			n.d.Attester = client
			var rounds []attest.Round
			n.d.Reattested = func(r attest.Round) { rounds = append(rounds, r) }
			// Re-attestation every 50 ms, or (at boot) none during the test.
			n.d.ReattestEvery = 50 * time.Millisecond
			n.d.ReattestBounds = attest.ReattestBounds{Min: 50 * time.Millisecond, Max: 100 * time.Millisecond}
			if tc.boot {
				n.d.ReattestEvery = time.Hour
				n.d.ReattestBounds.Max = time.Hour
				boot := attesttest.Context(t, 10*time.Second)
				res, late, err := client.AttestFirst(boot, attest.Backoff{Initial: 50 * time.Millisecond, Max: 200 * time.Millisecond}, 2)
				if err != nil || len(res) != 2 || slow.Answered() != 0 {
					t.Fatalf("unlock: %d results, err %v, slowest broker answered %d times", len(res), err, slow.Answered())
				}
				n.d.Late = late
				cert.Store(attest.Round(res).Certificate())
			}
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			stop := n.Run(ctx)
			if stop.Reason != tc.want {
				t.Fatalf("stopped with %v, want %s", stop, tc.want)
			}
			var ld *attest.LockdownError
			if got := errors.As(stop, &ld); got != (tc.want == ReasonLockdown) || (got && ld.Broker != "broker-c") {
				t.Fatalf("stopped with %v: lockdown not the slowest broker's", stop)
			}
			if tc.want == ReasonDone && !tc.boot && (len(rounds) < 2 || len(rounds[0]) != 3) {
				heard := 0
				if len(rounds) > 0 {
					heard = len(rounds[0])
				}
				t.Fatalf("kept serving with %d re-attestations, the first of %d brokers; want at least 2 of all 3", len(rounds), heard)
			}
			if tc.want == ReasonDone && tc.boot {
				// The slowest broker's certificate joined the one served.
				var chain []*x509.Certificate
				for _, der := range cert.Load().Certificate {
					c, err := x509.ParseCertificate(der)
					if err != nil {
						t.Fatal(err)
					}
					chain = append(chain, c)
				}
				got, err := client.Verifier().Verify(chain, time.Now(), x509.ExtKeyUsageServerAuth)
				if err != nil || len(got.Brokers) != 3 {
					t.Fatalf("served certificate vouched by %v (%v), want all 3 brokers", got.Brokers, err)
				}
			}
		})
	}
}

// TestSlowUploadCut: a body that arrives slower than the minimum upload
// rate is cut once its time (grace + length at that rate) is up, so a
// trickle cannot hold a connection and the upload budget; a body sent at
// once is read whole.
func TestSlowUploadCut(t *testing.T) {
	read := make(chan error, 2)
	n := New(Deps{
		Log:    slog.New(slog.NewTextHandler(io.Discard, nil)),
		Health: HealthFunc(func() *api.Health { return &api.Health{} }),
		Ingest: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, err := io.ReadAll(r.Body)
			read <- err
		}),
		Replication: named("replication"), Metrics: named("metrics"),
		MinUploadRate: 1 << 20, UploadGrace: 200 * time.Millisecond,
	})
	srv := httptest.NewServer(n.Handler())
	defer srv.Close()
	const length = 1 << 20 // 1 s at the minimum rate, plus the grace
	cases := []struct {
		name    string
		sent    int
		wantErr bool
		atLeast time.Duration
		atMost  time.Duration
	}{
		{"sent at once", length, false, 0, 5 * time.Second},
		{"trickle", 10, true, time.Second, 5 * time.Second},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			conn, err := net.Dial("tcp", srv.Listener.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			start := time.Now()
			fmt.Fprintf(conn, "POST /population/data/x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", length)
			conn.Write(make([]byte, tc.sent))
			select {
			case err := <-read:
				took := time.Since(start)
				if (err != nil) != tc.wantErr || took < tc.atLeast || took > tc.atMost {
					t.Fatalf("read ended after %s with %v", took, err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the trickle was never cut")
			}
		})
	}
}

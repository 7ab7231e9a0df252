package qemutests

import (
	"context"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dataembassy/embassy/protocol/api"
)

// failoverProxy stands in for the home state's multipath client: restic
// has one URL, so the proxy on 127.0.0.1 offers it and forwards each
// connection to the first of the appliance's NIC forwards that answers the
// TLS ClientHello within a few seconds. A connection on which nothing
// moves for idleCutoff is closed, so the client retries on a fresh one.
// It knows nothing of the VM: it finds a dead path the way a client does.
type failoverProxy struct {
	ln        net.Listener
	upstreams []string
	used      []atomic.Int64
	wg        sync.WaitGroup
	mu        sync.Mutex
	connected [][]time.Time // per upstream: when each connection got through
}

const idleCutoff = 15 * time.Second

// Failover bounds. A client's connection over a dead path stalls until the
// proxy's idle cut-off (15 s); its retry finds the live path after one
// failed ClientHello (4 s): about 20 s, bounded at 45 s. Replication pings
// every path every 2 s: a few seconds, bounded at 30 s.
const (
	maxIngestFailover      = 45 * time.Second
	maxReplicationFailover = 30 * time.Second
)

// firstAfter returns when the first connection over upstream i got
// through after t0, if one did.
func (p *failoverProxy) firstAfter(i int, t0 time.Time) (time.Time, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, at := range p.connected[i] {
		if at.After(t0) {
			return at, true
		}
	}
	return time.Time{}, false
}

func newFailoverProxy(t testing.TB, ports ...int) *failoverProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &failoverProxy{ln: ln, used: make([]atomic.Int64, len(ports)), connected: make([][]time.Time, len(ports))}
	for _, port := range ports {
		p.upstreams = append(p.upstreams, fmt.Sprintf("127.0.0.1:%d", port))
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go p.handle(c)
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return p
}

func (p *failoverProxy) port() int { return p.ln.Addr().(*net.TCPAddr).Port }

func (p *failoverProxy) handle(c net.Conn) {
	defer c.Close()
	first := make([]byte, 64<<10)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := c.Read(first)
	if err != nil {
		return
	}
	c.SetReadDeadline(time.Time{})
	for i, up := range p.upstreams {
		u, err := net.DialTimeout("tcp", up, 2*time.Second)
		if err != nil {
			continue
		}
		if _, err := u.Write(first[:n]); err != nil {
			u.Close()
			continue
		}
		answer := make([]byte, 64<<10)
		u.SetReadDeadline(time.Now().Add(4 * time.Second))
		m, err := u.Read(answer)
		if err != nil {
			u.Close()
			continue
		}
		u.SetReadDeadline(time.Time{})
		if _, err := c.Write(answer[:m]); err != nil {
			u.Close()
			return
		}
		p.used[i].Add(1)
		p.mu.Lock()
		p.connected[i] = append(p.connected[i], time.Now())
		p.mu.Unlock()
		pipe(c, u)
		return
	}
}

// pipe copies both ways until either side closes or nothing moves for
// idleCutoff.
func pipe(c, u net.Conn) {
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	done := make(chan struct{}, 2)
	cp := func(dst, src net.Conn) {
		buf := make([]byte, 64<<10)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				last.Store(time.Now().UnixNano())
				if _, werr := dst.Write(buf[:n]); werr != nil {
					break
				}
				last.Store(time.Now().UnixNano())
			}
			if err != nil {
				break
			}
		}
		done <- struct{}{}
	}
	go cp(u, c)
	go cp(c, u)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-done:
			c.Close()
			u.Close()
			<-done
			return
		case <-tick.C:
			if time.Since(time.Unix(0, last.Load())) > idleCutoff {
				c.Close()
				u.Close()
				<-done
				<-done
				return
			}
		}
	}
}

// waitPath waits until tw replicates to its peer over endpoint want.
func waitPath(t testing.TB, ctx context.Context, tw *twin, port int, want string) {
	t.Helper()
	hc := ingestHTTP(t, "home-state-auditor")
	waitHealth(t, ctx, func() (*api.Health, error) { return health(hc, port) }, tw.name+" replicates via "+want,
		func(h *api.Health) bool { return len(h.Peers) == 1 && h.Peers[0].Path == want })
}

// TestNICFailover: during a large backup into A, A's first NIC loses its
// link. The backup resumes over the second NIC's forward within
// maxIngestFailover and completes, replication to B moves to A's second
// NIC within maxReplicationFailover, and once the link is back the first
// path is used again. Then the same with B's first NIC: A's pushes move to
// B's second endpoint within maxReplicationFailover.
func TestNICFailover(t *testing.T) {
	parallelScenario(t, 2, 140*time.Second)
	ctx, _, a, b, hc := twinDrill(t, 20*time.Minute)
	proxy := newFailoverProxy(t, a.ports[0], a.ports[1])
	ra := newResticClient(t, proxy.port(), "population-registry")
	ra.packMiB = 4 // the links go down after a few small packs, with most of the backup to come
	mustRestic(t, ra, "init")
	waitPath(t, ctx, a, a.ports[0], b.endpoints()[0])

	// A's first NIC.
	from := len(a.v.Lines())
	done := backgroundBackup(t, ra, randomTree(t, 8, 8<<20))
	waitStored(t, ctx, a, from, 3, "/data")
	before := proxy.used[1].Load()
	if err := a.v.SetLink(0, false); err != nil {
		t.Fatal(err)
	}
	down := time.Now()
	// Replication moves to A's second NIC (A's health is read there too)
	// while the backup goes on.
	waitPath(t, ctx, a, a.ports[1], b.endpoints()[1])
	if d := time.Since(down); d > maxReplicationFailover {
		t.Fatalf("A's replication moved to its second NIC %.1fs after the link went down, bound %s", d.Seconds(), maxReplicationFailover)
	} else {
		t.Logf("replication failover (A's NIC): %.1fs (bound %s)", d.Seconds(), maxReplicationFailover)
	}
	if err := <-done; err != nil {
		t.Fatalf("backup with A's first NIC down: %v", err)
	}
	t.Logf("backup finished %.1fs after A's first link went down; connections over the second NIC: %d", time.Since(down).Seconds(), proxy.used[1].Load()-before)
	resumed, ok := proxy.firstAfter(1, down)
	if !ok {
		t.Fatal("no connection went over A's second NIC")
	}
	if d := resumed.Sub(down); d > maxIngestFailover {
		t.Fatalf("ingest resumed over A's second NIC %.1fs after the link went down, bound %s", d.Seconds(), maxIngestFailover)
	} else {
		t.Logf("ingest failover: %.1fs (bound %s)", d.Seconds(), maxIngestFailover)
	}
	a.ports[0], a.ports[1] = a.ports[1], a.ports[0] // list through the live forward
	waitConverged(t, ctx, hc, a, b)
	a.ports[0], a.ports[1] = a.ports[1], a.ports[0]

	if err := a.v.SetLink(0, true); err != nil {
		t.Fatal(err)
	}
	waitPath(t, ctx, a, a.ports[0], b.endpoints()[0])
	before0 := proxy.used[0].Load()
	mustRestic(t, ra, "backup", randomTree(t, 2, 1<<20))
	if proxy.used[0].Load() == before0 {
		t.Fatal("ingest did not return to A's first NIC")
	}
	waitConverged(t, ctx, hc, a, b)

	// B's first NIC: A's pushes move to B's second endpoint and back.
	from = len(a.v.Lines())
	done = backgroundBackup(t, ra, randomTree(t, 6, 8<<20))
	waitStored(t, ctx, a, from, 2, "/data")
	if err := b.v.SetLink(0, false); err != nil {
		t.Fatal(err)
	}
	bDown := time.Now()
	waitPath(t, ctx, a, a.ports[0], b.endpoints()[1])
	if d := time.Since(bDown); d > maxReplicationFailover {
		t.Fatalf("A's replication moved to B's second endpoint %.1fs after B's link went down, bound %s", d.Seconds(), maxReplicationFailover)
	} else {
		t.Logf("replication failover (B's NIC): %.1fs (bound %s)", d.Seconds(), maxReplicationFailover)
	}
	if err := <-done; err != nil {
		t.Fatalf("backup with B's first NIC down: %v", err)
	}
	b.ports[0], b.ports[1] = b.ports[1], b.ports[0]
	waitConverged(t, ctx, hc, a, b)
	b.ports[0], b.ports[1] = b.ports[1], b.ports[0]
	if err := b.v.SetLink(0, true); err != nil {
		t.Fatal(err)
	}
	waitPath(t, ctx, a, a.ports[0], b.endpoints()[0])
	mustRestic(t, ra, "backup", randomTree(t, 2, 1<<20))
	waitConverged(t, ctx, hc, a, b)
	rb := newResticClient(t, b.ports[0], "population-registry")
	mustRestic(t, rb, "check", "--read-data")
}

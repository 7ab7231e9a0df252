package replicate

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"
)

// item is one object waiting for a peer.
type item struct {
	ns, name string
	size     int64
	since    time.Time
	busy     bool
}

func (p *peer) enqueue(ns, name string, size int64, since time.Time) {
	key := ns + "\x00" + name
	p.mu.Lock()
	if _, ok := p.pending[key]; ok {
		p.mu.Unlock()
		return
	}
	if len(p.pending) >= p.r.opts.MaxPending {
		if !p.overflow {
			p.r.log.Warn("replication queue full; anti-entropy will catch up", "peer", p.id, "pending", len(p.pending))
		}
		p.overflow = true
		p.mu.Unlock()
		return
	}
	p.pending[key] = &item{ns: ns, name: name, size: size, since: since}
	p.order = append(p.order, key)
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// next takes the oldest idle item.
func (p *peer) next() (string, *item) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.order) > 2*len(p.pending)+64 {
		p.compact()
	}
	for _, key := range p.order {
		if it, ok := p.pending[key]; ok && !it.busy {
			it.busy = true
			return key, it
		}
	}
	return "", nil
}

func (p *peer) compact() {
	live := p.order[:0]
	for _, k := range p.order {
		if _, ok := p.pending[k]; ok {
			live = append(live, k)
		}
	}
	p.order = live
}

func (p *peer) done(key string, ok bool, errText string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ok {
		delete(p.pending, key)
		if len(p.pending) == 0 {
			p.order = p.order[:0]
			if p.overflow {
				p.overflow = false
				select {
				case p.ae <- struct{}{}:
				default:
				}
			}
		}
		return
	}
	if it := p.pending[key]; it != nil {
		it.busy = false
	}
	p.lastErr = errText
}

func (p *peer) work(ctx context.Context) {
	backoff := time.Second
	for {
		key, it := p.next()
		if it == nil {
			select {
			case <-ctx.Done():
				return
			case <-p.wake:
				continue
			case <-time.After(time.Second):
				continue
			}
		}
		err := p.push(ctx, it)
		switch {
		case err == nil:
			p.done(key, true, "")
			backoff = time.Second
			// More may be waiting; let a sibling worker wake too.
			select {
			case p.wake <- struct{}{}:
			default:
			}
		case errors.Is(err, errPermanent):
			p.conflicts.Inc()
			p.r.log.Error("replication refused by peer; object left out", "peer", p.id, "ns", it.ns, "name", it.name, "err", err.Error())
			p.done(key, true, err.Error())
		default:
			p.failures.Inc()
			p.done(key, false, err.Error())
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 10*time.Second)
		}
	}
}

var errPermanent = errors.New("permanent refusal")

// push sends one object to the peer.
func (p *peer) push(ctx context.Context, it *item) error {
	data, err := p.r.store.Get(it.ns, it.name)
	if err != nil {
		return fmt.Errorf("read %s/%s: %w", it.ns, it.name, err)
	}
	q := url.Values{"ns": {it.ns}, "name": {it.name}}
	resp, err := p.do(ctx, http.MethodPut, PathObject+"?"+q.Encode(), data)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
	switch {
	case resp.StatusCode/100 == 2:
		p.sent.Inc()
		p.sentBytes.Add(float64(len(data)))
		return nil
	case resp.StatusCode == http.StatusConflict || resp.StatusCode == http.StatusBadRequest || resp.StatusCode == http.StatusRequestEntityTooLarge:
		return fmt.Errorf("%w: %s: %s", errPermanent, resp.Status, bytes.TrimSpace(msg))
	}
	return fmt.Errorf("peer answered %s: %s", resp.Status, bytes.TrimSpace(msg))
}

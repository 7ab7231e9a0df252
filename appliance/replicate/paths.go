package replicate

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

type path struct {
	endpoint string
	client   *http.Client
	probe    *http.Client
	up       atomic.Bool
	mu       sync.Mutex
	inflight map[*context.CancelFunc]bool
}

// do sends a request over the first path that is up, falling over to the
// next at once when a path fails. A failed path is marked down and left to
// the prober.
func (p *peer) do(ctx context.Context, method, target string, body []byte) (*http.Response, error) {
	if len(p.paths) == 0 {
		return nil, errors.New("no path to the peer")
	}
	var errs []error
	for _, pa := range p.pathsToTry() {
		resp, err := pa.send(ctx, p.r.opts, method, target, body)
		if err == nil {
			return resp, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if pa.up.CompareAndSwap(true, false) {
			p.r.log.Warn("replication path down; trying the next", "peer", p.id, "endpoint", pa.endpoint, "err", err.Error())
		}
		errs = append(errs, fmt.Errorf("%s: %w", pa.endpoint, err))
	}
	return nil, errors.Join(errs...)
}

// pathsToTry lists the paths: those up first, in configured order, then
// those down (a path may come back before the prober notices).
func (p *peer) pathsToTry() []*path {
	var up, down []*path
	for _, pa := range p.paths {
		if pa.up.Load() {
			up = append(up, pa)
		} else {
			down = append(down, pa)
		}
	}
	return append(up, down...)
}

func (pa *path) send(ctx context.Context, o Options, method, target string, body []byte) (*http.Response, error) {
	limit := 10*time.Second + time.Duration(int64(len(body))*int64(time.Second)/o.MinRate)
	rctx, cancel := context.WithTimeout(ctx, limit)
	pa.track(&cancel, true)
	req, err := http.NewRequestWithContext(rctx, method, "https://"+pa.endpoint+target, bytes.NewReader(body))
	if err != nil {
		pa.track(&cancel, false)
		cancel()
		return nil, err
	}
	resp, err := pa.client.Do(req)
	if err != nil {
		pa.track(&cancel, false)
		cancel()
		return nil, err
	}
	resp.Body = &cancelOnClose{ReadCloser: resp.Body, done: func() { pa.track(&cancel, false); cancel() }}
	return resp, nil
}

// track remembers in-flight requests so that a path found dead cancels them.
func (pa *path) track(c *context.CancelFunc, add bool) {
	pa.mu.Lock()
	defer pa.mu.Unlock()
	if add {
		pa.inflight[c] = true
	} else {
		delete(pa.inflight, c)
	}
}

func (pa *path) abort() {
	pa.mu.Lock()
	defer pa.mu.Unlock()
	for c := range pa.inflight {
		(*c)()
	}
	pa.client.CloseIdleConnections()
}

type cancelOnClose struct {
	io.ReadCloser
	done func()
	once sync.Once
}

func (c *cancelOnClose) Close() error {
	err := c.ReadCloser.Close()
	c.once.Do(c.done)
	return err
}

// probeLoop pings every path. A path that stops answering is marked down
// and its requests are cancelled, so they are retried on another path at
// once; a path that answers again is marked up and preferred again.
func (p *peer) probeLoop(ctx context.Context) {
	t := time.NewTicker(p.r.opts.ProbeEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, pa := range p.paths {
			err := pa.ping(ctx)
			if ctx.Err() != nil {
				return
			}
			switch {
			case err != nil && pa.up.CompareAndSwap(true, false):
				p.r.log.Warn("replication path down", "peer", p.id, "endpoint", pa.endpoint, "err", err.Error())
				pa.abort()
			case err == nil && pa.up.CompareAndSwap(false, true):
				p.r.log.Info("replication path up again", "peer", p.id, "endpoint", pa.endpoint)
				select {
				case p.wake <- struct{}{}:
				default:
				}
			}
		}
	}
}

func (pa *path) ping(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+pa.endpoint+PathPing, nil)
	if err != nil {
		return err
	}
	resp, err := pa.probe.Do(req)
	if err != nil {
		return err
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 1024))
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		return fmt.Errorf("ping answered %s", resp.Status)
	}
	return nil
}

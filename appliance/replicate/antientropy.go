package replicate

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"time"

	"github.com/dataembassy/embassy/appliance/objectio"
	"github.com/dataembassy/embassy/appliance/objref"
)

func (p *peer) antiEntropyLoop(ctx context.Context) {
	for {
		if err := p.antiEntropy(ctx); err != nil && ctx.Err() == nil {
			p.mu.Lock()
			p.lastErr = err.Error()
			p.mu.Unlock()
			p.r.log.Warn("anti-entropy pass failed", "peer", p.id, "err", err.Error())
		}
		wait := p.r.opts.AntiEntropyEvery
		select {
		case <-ctx.Done():
			return
		case <-p.ae:
		case <-time.After(wait):
		}
	}
}

// antiEntropy compares every replicated namespace with the peer: objects
// the peer lacks are queued for it, objects only the peer has are fetched,
// verified and stored. A named object ("config") held by both with
// different content is reported, never overwritten.
func (p *peer) antiEntropy(ctx context.Context) error {
	start := time.Now()
	local, err := p.r.store.Namespaces()
	if err != nil {
		return err
	}
	var remote []string
	if err := p.getJSON(ctx, PathNamespaces, &remote); err != nil {
		return err
	}
	all := map[string]bool{}
	for _, ns := range append(local, remote...) {
		if Replicated(ns) {
			all[ns] = true
		}
	}
	names := make([]string, 0, len(all))
	for ns := range all {
		names = append(names, ns)
	}
	// Data before indexes before snapshots, so a peer never holds a
	// snapshot whose data it lacks for longer than needed.
	sort.Slice(names, func(i, j int) bool {
		return typeRank(names[i]) < typeRank(names[j]) || (typeRank(names[i]) == typeRank(names[j]) && names[i] < names[j])
	})
	queued, pulled := 0, 0
	for _, ns := range names {
		mine, err := p.r.store.List(ns)
		if err != nil {
			return err
		}
		var theirs []ListEntry
		if err := p.getJSON(ctx, PathList+"?"+url.Values{"ns": {ns}}.Encode(), &theirs); err != nil {
			return err
		}
		have := map[string]int64{}
		for _, o := range theirs {
			have[o.Name] = o.Size
		}
		ours := map[string]bool{}
		for _, o := range mine {
			ours[o.Name] = true
			if _, ok := have[o.Name]; !ok {
				p.enqueue(ns, o.Name, o.Size, time.Now())
				queued++
			} else if !objref.ContentAddressed(o.Name) {
				if err := p.compareNamed(ctx, ns, o.Name); err != nil {
					p.r.log.Error("replicas differ", "peer", p.id, "ns", ns, "name", o.Name, "err", err.Error())
				}
			}
		}
		for _, o := range theirs {
			if ours[o.Name] {
				continue
			}
			if err := p.pull(ctx, ns, o.Name); err != nil {
				return fmt.Errorf("fetch %s/%s: %w", ns, o.Name, err)
			}
			pulled++
		}
	}
	p.r.log.Info("anti-entropy pass", "peer", p.id, "namespaces", len(names), "queued", queued, "fetched", pulled, "elapsed_ms", time.Since(start).Milliseconds())
	return nil
}

// typeRank orders namespaces by type, in the order of objref.Types.
func typeRank(ns string) int {
	_, typ, err := objref.ParseNamespace(ns)
	if err != nil {
		return len(objref.Types)
	}
	return slices.Index(objref.Types, typ)
}

// get sends a GET over the peer's paths and returns the body of a 200.
func (p *peer) get(ctx context.Context, target string) (io.ReadCloser, error) {
	resp, err := p.do(ctx, http.MethodGet, target, nil)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		resp.Body.Close()
		return nil, fmt.Errorf("peer answered %s: %s", resp.Status, bytes.TrimSpace(msg))
	}
	return resp.Body, nil
}

// fetch gets an object from the peer; a content-addressed one is checked
// against its name.
func (p *peer) fetch(ctx context.Context, ns, name string) ([]byte, error) {
	body, err := p.get(ctx, PathObject+"?"+url.Values{"ns": {ns}, "name": {name}}.Encode())
	if err != nil {
		return nil, err
	}
	defer body.Close()
	data, err := objectio.ReadLimited(body, objectio.DefaultMaxObject)
	if err != nil {
		return nil, err
	}
	return data, objref.CheckContent(name, data)
}

func (p *peer) pull(ctx context.Context, ns, name string) error {
	data, err := p.fetch(ctx, ns, name)
	if err != nil {
		return err
	}
	if _, err := p.r.store.Put(ns, name, data); err != nil {
		return err
	}
	p.pulled.Inc()
	return nil
}

func (p *peer) compareNamed(ctx context.Context, ns, name string) error {
	theirs, err := p.fetch(ctx, ns, name)
	if err != nil {
		return err
	}
	mine, err := p.r.store.Get(ns, name)
	if err != nil {
		return err
	}
	if !bytes.Equal(mine, theirs) {
		p.conflicts.Inc()
		return errors.New("named object differs between the appliances; left as it is on both")
	}
	return nil
}

func (p *peer) getJSON(ctx context.Context, target string, v any) error {
	body, err := p.get(ctx, target)
	if err != nil {
		return err
	}
	defer body.Close()
	return json.NewDecoder(io.LimitReader(body, 64<<20)).Decode(v)
}

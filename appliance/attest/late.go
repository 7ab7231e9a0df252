package attest

import (
	"context"
	"crypto/tls"
)

// Late is the rest of a round after its first want answers: the other
// brokers' attestations, which go on until each has answered or the
// round's context ends. A lockdown that any of them orders counts as one
// from the first k: the appliance stops (node.Deps.Late).
type Late struct {
	done    chan struct{}
	first   Round     // the round's first want answers
	err     error     // set before done is closed
	results []*Result // the late successes (their shares wiped unless kept for AttestAll); set before done is closed
}

// Done is closed once every other broker has answered or the round ended.
func (l *Late) Done() <-chan struct{} { return l.done }

// Err is nil until Done is closed; then it is a *LockdownError if one of
// the other brokers ordered a lockdown, else nil.
func (l *Late) Err() error {
	select {
	case <-l.done:
		return l.err
	default:
		return nil
	}
}

// Wait waits until Done is closed and returns Err.
func (l *Late) Wait() error {
	<-l.done
	return l.err
}

// Certificate is what the appliance presents once the round is over: the
// Round.Certificate of the first answers and every late success, so that
// a peer still counts k brokers when it refuses one of the first k's
// certificates (expired, or a broker it no longer trusts). It is nil
// until Done is closed, and after a lockdown.
func (l *Late) Certificate() *tls.Certificate {
	select {
	case <-l.done:
	default:
		return nil
	}
	if l.err != nil {
		return nil
	}
	all := append(Round(nil), l.first...)
	return append(all, l.results...).Certificate()
}

// listenLate reads the left answers still to come on answers, then ends
// the round (cancel). A lockdown among them ends it at once. Late
// successes are kept, their shares too if keep, else wiped on arrival.
// first are the round's first answers (for Certificate).
func listenLate(answers <-chan *Result, left int, cancel context.CancelFunc, keep bool, first []*Result) *Late {
	l := &Late{done: make(chan struct{}), first: first}
	go func() {
		defer close(l.done)
		defer cancel()
		for range left {
			r := <-answers
			if ld := lockdownOf(r); ld != nil {
				Round(l.results).WipeShares()
				l.results, l.err = nil, ld
				return
			}
			if r.Err != nil {
				continue
			}
			if !keep {
				Round{r}.WipeShares()
			}
			l.results = append(l.results, r)
		}
	}()
	return l
}

package attest

import "context"

// Late is the rest of a round after its first want answers: the other
// brokers' attestations, which go on until each has answered or the
// round's context ends. A lockdown that any of them orders counts as one
// from the first k: the appliance stops (node.Deps.Late).
type Late struct {
	done    chan struct{}
	err     error     // set before done is closed
	results []*Result // the late successes, kept for AttestAll only
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

// listenLate reads the left answers still to come on answers, then ends
// the round (cancel). A lockdown among them ends it at once. Late
// successes are kept if keep, else their shares are wiped on arrival.
func listenLate(answers <-chan *Result, left int, cancel context.CancelFunc, keep bool) *Late {
	l := &Late{done: make(chan struct{})}
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
			switch {
			case r.Err != nil:
			case keep:
				l.results = append(l.results, r)
			default:
				Round{r}.WipeShares()
			}
		}
	}()
	return l
}

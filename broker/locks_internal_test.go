package broker

import (
	"testing"
	"time"
)

// TestApplianceLocks: one appliance's lock excludes a second holder of the
// same id but not another appliance's, and the table forgets an id once
// nobody holds or waits for it.
func TestApplianceLocks(t *testing.T) {
	var l applianceLocks
	unlockA := l.lock("a")
	unlockB := l.lock("b") // would block forever under one global lock
	got := make(chan struct{})
	go func() {
		defer l.lock("a")()
		close(got)
	}()
	select {
	case <-got:
		t.Fatal("a second holder took appliance a's lock while it was held")
	case <-time.After(50 * time.Millisecond):
	}
	unlockA()
	<-got
	unlockB()
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.byID) != 0 {
		t.Fatalf("%d lock entries left after every holder released", len(l.byID))
	}
}

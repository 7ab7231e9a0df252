package audit

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestAppendVerifyReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, Head{})
	if err != nil {
		t.Fatal(err)
	}
	h1, err := l.Append(Entry{Event: "enroll", Appliance: "a", Result: "ok"})
	if err != nil {
		t.Fatal(err)
	}
	h2, err := l.Append(Entry{Event: "attest", Result: "fail", Reason: "nonce expired"}, Entry{Event: "release", Result: "ok"})
	if err != nil {
		t.Fatal(err)
	}
	if h1.Seq != 1 || h2.Seq != 3 || l.Head() != h2 {
		t.Fatalf("heads %+v %+v", h1, h2)
	}
	l.Close()
	// Reopening with the recorded head works; with a head the file does
	// not contain, it is refused.
	l, err = Open(path, h2)
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	if _, err := Open(path, Head{Seq: 4, Hash: h2.Hash}); !errors.Is(err, ErrTampered) {
		t.Fatalf("head beyond the file: %v", err)
	}
	// A truncated file is refused against the recorded head.
	raw, _ := os.ReadFile(path)
	lines := bytes.SplitAfter(raw, []byte("\n"))
	os.WriteFile(path, bytes.Join(lines[:2], nil), 0o600)
	if _, err := Open(path, h2); !errors.Is(err, ErrTampered) {
		t.Fatalf("truncated log: %v", err)
	}
}

func TestReadRejectsUnknownFields(t *testing.T) {
	if _, err := Read(bytes.NewReader([]byte(`{"seq":1,"extra":true}` + "\n"))); !errors.Is(err, ErrTampered) {
		t.Fatalf("unknown field: %v", err)
	}
}

func FuzzRead(f *testing.F) {
	path := filepath.Join(f.TempDir(), "audit.log")
	l, _ := Open(path, Head{})
	l.Append(Entry{Event: "enroll", Result: "ok"}, Entry{Event: "attest", Result: "fail", Reason: "x"})
	l.Close()
	raw, _ := os.ReadFile(path)
	f.Add(raw)
	f.Fuzz(func(t *testing.T, b []byte) {
		entries, err := Read(bytes.NewReader(b))
		if err != nil {
			return
		}
		Verify(entries, nil)
	})
}

// TestActorCoveredByChain: whoever edits the log tries to change or hide
// who acted. Every such edit breaks the chain; entries written before the
// actor was recorded still verify.
func TestActorCoveredByChain(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, Head{})
	if err != nil {
		t.Fatal(err)
	}
	alice := Actor{Kind: ActorOperator, Subject: "CN=operator alice", Fingerprint: strings.Repeat("a", 64)}
	app := ApplianceActor(strings.Repeat("c", 32))
	head, err := l.Append(Entry{Event: "enroll-request", Appliance: app.ID, Result: "ok"}, // as written before actors
		Entry{Event: "revoke", Appliance: app.ID, Actor: &alice, Result: "ok"},
		Entry{Event: "attest", Appliance: app.ID, Actor: &app, Result: "fail", Reason: "appliance revoked"})
	if err != nil {
		t.Fatal(err)
	}
	entries, err := l.Entries()
	l.Close()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Verify(entries, &head); err != nil {
		t.Fatalf("untouched log: %v", err)
	}
	tests := []struct {
		name string
		edit func(es []Entry)
	}{
		{"another operator's subject", func(es []Entry) { es[1].Actor.Subject = "CN=operator bob" }},
		{"another certificate's fingerprint", func(es []Entry) { es[1].Actor.Fingerprint = strings.Repeat("b", 64) }},
		{"operator passed off as the appliance", func(es []Entry) { es[1].Actor = &app }},
		{"actor removed", func(es []Entry) { es[1].Actor = nil }},
		{"another appliance", func(es []Entry) { es[2].Actor = &Actor{Kind: ActorAppliance, ID: strings.Repeat("d", 32)} }},
		{"actor added to an old entry", func(es []Entry) { es[0].Actor = &alice }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			edited := make([]Entry, len(entries))
			for i, e := range entries {
				if e.Actor != nil {
					a := *e.Actor
					e.Actor = &a
				}
				edited[i] = e
			}
			tc.edit(edited)
			if _, err := Verify(edited, &head); !errors.Is(err, ErrTampered) {
				t.Fatalf("edit not detected: %v", err)
			}
		})
	}
}

// TestChain: Chain recomputes a log that Verify accepts, edited or not,
// keeping the entries' times.
func TestChain(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, Head{})
	if err != nil {
		t.Fatal(err)
	}
	head, _ := l.Append(Entry{Event: "enroll", Result: "ok"}, Entry{Event: "revoke", Result: "ok"})
	entries, _ := l.Entries()
	l.Close()
	if got := Chain(entries); got != head {
		t.Fatalf("Chain of an untouched log = %+v, want %+v", got, head)
	}
	when := entries[0].Time
	entries[0].Result = "fail"
	got := Chain(entries)
	if _, err := Verify(entries, &got); err != nil || got == head || !entries[0].Time.Equal(when) {
		t.Fatalf("rechained log: %v, head %+v", err, got)
	}
	if Chain(nil) != (Head{}) {
		t.Fatal("Chain of no entries is not the zero head")
	}
}

// TestDurableIsConsistent: while others append, Durable returns entries
// that verify and end at the head it returns.
func TestDurableIsConsistent(t *testing.T) {
	l, err := Open(filepath.Join(t.TempDir(), "audit.log"), Head{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 50; i++ {
			l.Append(Entry{Event: "attest", Result: "ok"})
		}
	}()
	for running := true; running; {
		select {
		case <-done:
			running = false
		default:
		}
		entries, head, err := l.Durable()
		if err != nil {
			t.Fatal(err)
		}
		if got, err := Verify(entries, &head); err != nil || got != head || head.Seq != uint64(len(entries)) {
			t.Fatalf("%d entries, head %+v: %v", len(entries), head, err)
		}
	}
	if _, head, _ := l.Durable(); head != l.Head() || head.Seq != 50 {
		t.Fatalf("durable head %+v, log head %+v", head, l.Head())
	}
}

// TestWriteThenSync: written entries are in the log at once but count as
// durable only once a Sync covers them; one Sync covers every entry
// written before it.
func TestWriteThenSync(t *testing.T) {
	l, err := Open(filepath.Join(t.TempDir(), "audit.log"), Head{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	h1, err := l.Write(Entry{Event: "attest", Result: "ok"})
	if err != nil {
		t.Fatal(err)
	}
	h2, err := l.Write(Entry{Event: "attest", Result: "ok"}, Entry{Event: "release", Result: "ok"})
	if err != nil {
		t.Fatal(err)
	}
	if all, _ := l.Entries(); len(all) != 3 || h2.Seq != 3 {
		t.Fatalf("%d entries written, head %+v", len(all), h2)
	}
	if entries, head, _ := l.Durable(); len(entries) != 0 || head != (Head{}) {
		t.Fatalf("durable before any sync: %d entries, head %+v", len(entries), head)
	}
	if err := l.Sync(h1.Seq); err != nil {
		t.Fatal(err)
	}
	if entries, head, _ := l.Durable(); len(entries) != 3 || head != h2 {
		t.Fatalf("after syncing to %d: %d durable entries, head %+v, want all 3", h1.Seq, len(entries), head)
	}
}

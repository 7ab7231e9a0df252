package pcrs_test

import (
	"slices"
	"testing"

	"github.com/dataembassy/embassy/tpm/pcrs"
)

func TestSelection(t *testing.T) {
	sel := pcrs.Selection()
	if sel.Hash != pcrs.Hash || !slices.Equal(sel.PCRs, []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13}) {
		t.Fatalf("selection %+v, want SHA-256 PCRs 0-9 and 11-13", sel)
	}
	if pcrs.Count != len(sel.PCRs) {
		t.Fatalf("Count %d, selection of %d", pcrs.Count, len(sel.PCRs))
	}
	// Callers get their own slice.
	sel.PCRs[0] = 23
	if pcrs.Indexes()[0] != 0 {
		t.Fatal("a caller changed the selection")
	}
}

func TestPlatform(t *testing.T) {
	p := pcrs.Platform()
	if !slices.Equal(p, []int{0, 1, 2, 3, 5, 6, 7}) {
		t.Fatalf("platform PCRs %v", p)
	}
	for _, i := range p {
		if !slices.Contains(pcrs.Indexes(), i) || !pcrs.IsPlatform(i) {
			t.Errorf("platform PCR %d is not quoted or not IsPlatform", i)
		}
	}
	for _, i := range []int{4, 8, 9, 10, 11, 12} {
		if pcrs.IsPlatform(i) {
			t.Errorf("PCR %d is not a platform PCR", i)
		}
	}
	p[0] = 23
	if pcrs.Platform()[0] != 0 {
		t.Fatal("a caller changed the platform PCRs")
	}
}

func TestCheck(t *testing.T) {
	full := func() map[int][]byte {
		m := map[int][]byte{}
		for _, i := range pcrs.Indexes() {
			m[i] = make([]byte, 32)
		}
		return m
	}
	tests := []struct {
		name   string
		change func(map[int][]byte)
		ok     bool
	}{
		{"exact", func(map[int][]byte) {}, true},
		{"missing", func(m map[int][]byte) { delete(m, 12) }, false},
		{"extra", func(m map[int][]byte) { m[10] = make([]byte, 32) }, false},
		{"swapped", func(m map[int][]byte) { delete(m, 11); m[10] = make([]byte, 32) }, false},
		{"short value", func(m map[int][]byte) { m[0] = []byte{1} }, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := full()
			tc.change(m)
			if err := pcrs.Check(m); (err == nil) != tc.ok {
				t.Fatalf("Check: %v, want ok %v", err, tc.ok)
			}
		})
	}
}

func TestProto(t *testing.T) {
	p := pcrs.Proto(map[int][]byte{4: {4}, 9: {9}})
	if p.GetHash() != pcrs.ProtoHash || len(p.GetPcrs()) != 2 || p.GetPcrs()[9][0] != 9 {
		t.Fatalf("proto %+v", p)
	}
}

package pcrs_test

import (
	"slices"
	"testing"

	"github.com/dataembassy/embassy/tpm/pcrs"
)

func TestSelection(t *testing.T) {
	sel := pcrs.Selection()
	if sel.Hash != pcrs.Hash || !slices.Equal(sel.PCRs, []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}) {
		t.Fatalf("selection %+v, want SHA-256 PCRs 0-9", sel)
	}
	// Callers get their own slice.
	sel.PCRs[0] = 23
	if pcrs.Indexes()[0] != 0 {
		t.Fatal("a caller changed the selection")
	}
}

func TestProto(t *testing.T) {
	p := pcrs.Proto(map[int][]byte{4: {4}, 9: {9}})
	if p.GetHash() != pcrs.ProtoHash || len(p.GetPcrs()) != 2 || p.GetPcrs()[9][0] != 9 {
		t.Fatalf("proto %+v", p)
	}
}

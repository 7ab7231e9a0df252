package qemutests

import (
	"slices"
	"testing"
	"time"
)

// TestSlotPoolCostliestFirst: the parallel phase's pool gives slots to the
// costliest waiting scenarios first, lets a cheaper one use slots a
// costlier one cannot, and never gives out more slots than it has.
func TestSlotPoolCostliestFirst(t *testing.T) {
	type req struct {
		name string
		n    int
		cost time.Duration
	}
	cases := []struct {
		name     string
		size     int
		reqs     []req
		releases []string // given back in this order, one per step
		want     [][]string
	}{
		{
			name: "twins first, singles fill",
			size: 4,
			reqs: []req{{"single-80", 1, 80 * time.Second}, {"twin-240", 2, 240 * time.Second}, {"twin-190", 2, 190 * time.Second}, {"single-30", 1, 30 * time.Second}, {"twin-90", 2, 90 * time.Second}},
			// At the start the two costliest twins take all four slots.
			releases: []string{"twin-240", "twin-90", "twin-190"},
			want: [][]string{
				{"twin-240", "twin-190"},
				{"twin-90"},
				{"single-80", "single-30"},
				{},
			},
		},
		{
			name:     "a cheaper one uses what a wider one cannot",
			size:     3,
			reqs:     []req{{"twin-240", 2, 240 * time.Second}, {"twin-190", 2, 190 * time.Second}, {"single-30", 1, 30 * time.Second}},
			releases: []string{"twin-240"},
			want:     [][]string{{"twin-240", "single-30"}, {"twin-190"}},
		},
		{
			name:     "wider than the pool takes all of it",
			size:     1,
			reqs:     []req{{"twin", 2, time.Minute}},
			releases: nil,
			want:     [][]string{{"twin"}},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := &slotPool{size: c.size, free: c.size, openAfter: 20 * time.Millisecond}
			granted := make(chan string, len(c.reqs))
			taken := map[string]int{}
			for i, r := range c.reqs {
				go func() {
					n := p.take(r.n, r.cost)
					p.mu.Lock()
					taken[r.name] = n
					p.mu.Unlock()
					granted <- r.name
				}()
				// Arrival order is the order of reqs.
				for {
					p.mu.Lock()
					arrived := p.arrived
					p.mu.Unlock()
					if arrived == i+1 {
						break
					}
					time.Sleep(time.Millisecond)
				}
			}
			step := func() []string {
				var got []string
				for {
					select {
					case name := <-granted:
						got = append(got, name)
					case <-time.After(200 * time.Millisecond):
						slices.Sort(got)
						return got
					}
				}
			}
			for i, want := range c.want {
				got := step()
				want = slices.Clone(want)
				slices.Sort(want)
				if !slices.Equal(got, want) {
					t.Fatalf("step %d: granted %v, want %v", i, got, want)
				}
				p.mu.Lock()
				if p.free < 0 {
					t.Fatalf("step %d: %d slots free", i, p.free)
				}
				p.mu.Unlock()
				if i < len(c.releases) {
					p.mu.Lock()
					n := taken[c.releases[i]]
					p.mu.Unlock()
					p.give(n)
				}
			}
		})
	}
}

package objref

import (
	"errors"
	"strings"
	"testing"
)

var hash = strings.Repeat("0123456789abcdef", 4)

func TestParse(t *testing.T) {
	cases := []struct {
		name, ns, obj string
		ok            bool
	}{
		{"data object", "population/data", hash, true},
		{"every type", "p/snapshots", hash, true},
		{"index", "p/index", hash, true},
		{"keys", "p/keys", hash, true},
		{"locks", "p/locks", hash, true},
		{"config", "population/config", "config", true},
		{"repo with dot dash underscore", "reg.v2_a-b/data", hash, true},
		{"repo of 64", strings.Repeat("r", 64) + "/data", hash, true},
		{"repo of 65", strings.Repeat("r", 65) + "/data", hash, false},
		{"empty namespace", "", hash, false},
		{"no type", "population", hash, false},
		{"empty repo", "/data", hash, false},
		{"empty type", "population/", hash, false},
		{"three parts", "a/b/c", hash, false},
		{"traversal repo", "../etc/data", hash, false},
		{"dot dot inside repo", "a..b/data", hash, false},
		{"repo starting with dot", ".a/data", hash, false},
		{"repo starting with dash", "-a/data", hash, false},
		{"uppercase repo", "Pop/data", hash, false},
		{"space in repo", "po p/data", hash, false},
		{"backslash in repo", `a\b/data`, hash, false},
		{"nul in repo", "a\x00/data", hash, false},
		{"unknown type", "population/secrets", hash, false},
		{"uppercase type", "population/Data", hash, false},
		{"traversal name", "population/data", "../../x", false},
		{"uppercase hex", "population/data", strings.ToUpper(hash), false},
		{"short hash", "population/data", hash[:63], false},
		{"long hash", "population/data", hash + "0", false},
		{"non-hex", "population/data", strings.Repeat("g", 64), false},
		{"empty name", "population/data", "", false},
		{"slash in name", "population/data", hash[:32] + "/" + hash[33:], false},
		{"named data object", "population/data", "config", false},
		{"config with other name", "population/config", "other", false},
		{"config with tilde", "population/data", "config~x", false},
		{"config with hash name", "population/config", hash, false},
		{"config with empty name", "population/config", "", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r, err := Parse(c.ns, c.obj)
			if c.ok != (err == nil) {
				t.Fatalf("Parse(%q, %q) = %v, want ok=%v", c.ns, c.obj, err, c.ok)
			}
			if err != nil {
				if !errors.Is(err, ErrInvalid) {
					t.Fatalf("error %v is not ErrInvalid", err)
				}
				return
			}
			if r.Namespace() != c.ns || r.Name != c.obj || r.Validate() != nil {
				t.Fatalf("ref %+v does not round-trip", r)
			}
			if r.ContentAddressed() != (r.Type != TypeConfig) {
				t.Fatalf("ref %+v: content-addressed %v", r, r.ContentAddressed())
			}
		})
	}
}

// TestCheckRepo: the repository names the image configuration may use.
func TestCheckRepo(t *testing.T) {
	for repo, ok := range map[string]bool{
		"population": true, "a": true, "0": true, "cadastre-2026": true,
		"": false, "Pop/../x": false, "pop/x": false, "..": false, ".": false,
		"pop ulation": false, "popülation": false, strings.Repeat("a", 65): false,
	} {
		if err := CheckRepo(repo); (err == nil) != ok {
			t.Errorf("CheckRepo(%q) = %v, want ok=%v", repo, err, ok)
		}
	}
}

func TestCheckContent(t *testing.T) {
	data := []byte("payload")
	name := Digest(data)
	cases := []struct {
		name, obj string
		data      []byte
		wantErr   error
	}{
		{"matches", name, data, nil},
		{"named object is not checked", "config", data, nil},
		{"other content", name, []byte("other"), ErrHashMismatch},
		{"other name", hash, data, ErrHashMismatch},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if err := CheckContent(c.obj, c.data); !errors.Is(err, c.wantErr) || (c.wantErr == nil) != (err == nil) {
				t.Fatalf("CheckContent: %v, want %v", err, c.wantErr)
			}
		})
	}
}

// FuzzParse: whatever Parse accepts validates, round-trips, and cannot
// leave its folder when joined into a path.
func FuzzParse(f *testing.F) {
	f.Add("population/data", hash)
	f.Add("population/config", "config")
	f.Add("../x/data", "../../y")
	f.Add("a/b/c", "")
	f.Fuzz(func(t *testing.T, ns, name string) {
		r, err := Parse(ns, name)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v is not ErrInvalid", err)
			}
			return
		}
		if r.Validate() != nil || r.Namespace() != ns || r.Name != name {
			t.Fatalf("accepted %q %q does not round-trip: %+v", ns, name, r)
		}
		for _, part := range []string{r.Repo, r.Type, r.Name} {
			if part == "" || part == "." || strings.Contains(part, "..") || strings.ContainsAny(part, "/\\\x00") {
				t.Fatalf("accepted unsafe part %q in %q %q", part, ns, name)
			}
		}
	})
}

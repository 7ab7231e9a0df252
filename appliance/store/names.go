package store

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/dataembassy/embassy/appliance/objref"
)

// objectPath returns the file of an object. Content-addressed objects fan
// out by their first two hex digits; named objects carry their digest in the
// file name ("config~<sha256>").
func objectPath(root, ns, name, digest string) string {
	if objref.ContentAddressed(name) {
		return filepath.Join(root, "objects", ns, name[:2], name)
	}
	return filepath.Join(root, "objects", ns, "named", name+"~"+digest)
}

// checkName checks a namespace and an object name against the grammar.
func checkName(ns, name string) error {
	_, err := objref.Parse(ns, name)
	return err
}

// namedDigest finds the digest of a named object on any readable disk.
func (s *Store) namedDigest(ns, name string) (string, error) {
	for _, d := range s.readable() {
		m, _ := filepath.Glob(filepath.Join(d.root, "objects", ns, "named", name+"~*"))
		for _, p := range m {
			dg := strings.TrimPrefix(filepath.Base(p), name+"~")
			if objref.ContentAddressed(dg) {
				return dg, nil
			}
		}
	}
	return "", ErrNotFound
}

// digestFor returns the digest an object's copies must hash to: its name
// for content-addressed objects, the digest kept in the file name for named
// ones.
func (s *Store) digestFor(ns, name string) (string, error) {
	if objref.ContentAddressed(name) {
		return name, nil
	}
	dg, err := s.namedDigest(ns, name)
	if err != nil {
		return "", fmt.Errorf("%s/%s: %w", ns, name, err)
	}
	return dg, nil
}

// walkNamespace calls fn for every object file of ns under root.
func walkNamespace(root, ns string, fn func(name, digest string, size int64)) error {
	_, typ, err := objref.ParseNamespace(ns)
	if err != nil {
		return err
	}
	base := filepath.Join(root, "objects", ns)
	subs, err := os.ReadDir(base)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, sub := range subs {
		ents, err := os.ReadDir(filepath.Join(base, sub.Name()))
		if err != nil {
			return err
		}
		for _, e := range ents {
			info, err := e.Info()
			if err != nil {
				continue
			}
			n := e.Name()
			if sub.Name() == "named" {
				name, dg, ok := strings.Cut(n, "~")
				if ok && !objref.ContentAddressed(name) && objref.CheckName(typ, name) == nil && objref.ContentAddressed(dg) {
					fn(name, dg, info.Size())
				}
				continue
			}
			if objref.CheckName(typ, n) == nil && objref.ContentAddressed(n) && n[:2] == sub.Name() {
				fn(n, n, info.Size())
			}
		}
	}
	return nil
}

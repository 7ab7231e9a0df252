// Package kmod reads a kernel's modules.dep and resolves the set of module
// files a list of wanted modules needs, dependencies first. mkimage uses it to
// pick the modules that go into the initramfs and to write a modules.dep
// trimmed to them.
package kmod

import (
	"bufio"
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
)

// Deps maps a module's path relative to the modules folder (as modules.dep
// writes it, e.g. "kernel/fs/ext4/ext4.ko") to the paths it depends on.
type Deps map[string][]string

// maxLine bounds one modules.dep line.
const maxLine = 1 << 20

// ParseDep parses modules.dep.
func ParseDep(r io.Reader) (Deps, error) {
	deps := Deps{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), maxLine)
	for line := 1; sc.Scan(); line++ {
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		mod, rest, ok := strings.Cut(text, ":")
		if !ok {
			return nil, fmt.Errorf("modules.dep line %d: no colon in %q", line, text)
		}
		mod = strings.TrimSpace(mod)
		if err := checkPath(mod); err != nil {
			return nil, fmt.Errorf("modules.dep line %d: %w", line, err)
		}
		var list []string
		for _, d := range strings.Fields(rest) {
			if err := checkPath(d); err != nil {
				return nil, fmt.Errorf("modules.dep line %d: %w", line, err)
			}
			list = append(list, d)
		}
		deps[mod] = list
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read modules.dep: %w", err)
	}
	return deps, nil
}

func checkPath(p string) error {
	if p == "" || strings.HasPrefix(p, "/") || path.Clean(p) != p || strings.HasPrefix(p, "../") {
		return fmt.Errorf("module path %q is not a clean relative path", p)
	}
	if !strings.Contains(path.Base(p), ".ko") {
		return fmt.Errorf("module path %q does not name a .ko file", p)
	}
	return nil
}

// Name returns the module name of a module file path: its base name without
// the .ko suffix (and any compression suffix), with dashes as underscores.
func Name(modPath string) string {
	base := path.Base(modPath)
	if i := strings.Index(base, ".ko"); i >= 0 {
		base = base[:i]
	}
	return strings.ReplaceAll(base, "-", "_")
}

// Find returns the path of the module called name.
func (d Deps) Find(name string) (string, bool) {
	want := strings.ReplaceAll(name, "-", "_")
	var found []string
	for p := range d {
		if Name(p) == want {
			found = append(found, p)
		}
	}
	if len(found) == 0 {
		return "", false
	}
	sort.Strings(found)
	return found[0], true
}

// Resolve returns the module files needed to load the named modules, each
// listed after all of its dependencies. Names in builtin (modules compiled
// into the kernel) are skipped. An unknown name is an error.
func (d Deps) Resolve(names []string, builtin map[string]bool) ([]string, error) {
	var order []string
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(p string, chain []string) error
	visit = func(p string, chain []string) error {
		switch state[p] {
		case 2:
			return nil
		case 1:
			return fmt.Errorf("dependency cycle: %s -> %s", strings.Join(chain, " -> "), p)
		}
		deps, ok := d[p]
		if !ok {
			return fmt.Errorf("module %s (needed by %s) is not in modules.dep", p, strings.Join(chain, " -> "))
		}
		state[p] = 1
		sorted := append([]string(nil), deps...)
		sort.Strings(sorted)
		for _, dep := range sorted {
			if err := visit(dep, append(chain, p)); err != nil {
				return err
			}
		}
		state[p] = 2
		order = append(order, p)
		return nil
	}
	for _, n := range names {
		if builtin[strings.ReplaceAll(n, "-", "_")] {
			continue
		}
		p, ok := d.Find(n)
		if !ok {
			return nil, fmt.Errorf("module %q is neither in modules.dep nor built in", n)
		}
		if err := visit(p, nil); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// Subset writes modules.dep lines for just the given module paths, in that
// order, keeping each one's full dependency list.
func (d Deps) Subset(paths []string) ([]byte, error) {
	var b strings.Builder
	for _, p := range paths {
		deps, ok := d[p]
		if !ok {
			return nil, fmt.Errorf("module %s is not in modules.dep", p)
		}
		b.WriteString(p + ":")
		for _, dep := range deps {
			b.WriteString(" " + dep)
		}
		b.WriteString("\n")
	}
	return []byte(b.String()), nil
}

// ParseBuiltin parses modules.builtin (one module path a line) into a set of
// module names.
func ParseBuiltin(r io.Reader) (map[string]bool, error) {
	set := map[string]bool{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if t := strings.TrimSpace(sc.Text()); t != "" {
			set[Name(t)] = true
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read modules.builtin: %w", err)
	}
	return set, nil
}

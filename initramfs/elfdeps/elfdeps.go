// Package elfdeps finds the shared libraries and the program interpreter a
// dynamically linked ELF program needs, the way the dynamic loader would
// search for them, so the program can be copied into an initramfs and run.
package elfdeps

import (
	"debug/elf"
	"fmt"
	"os"
	"path/filepath"
	"sort"
)

// DefaultSearchPath is the library search path of a Debian amd64 system.
var DefaultSearchPath = []string{
	"/lib/x86_64-linux-gnu",
	"/usr/lib/x86_64-linux-gnu",
	"/lib64",
	"/usr/lib64",
	"/lib",
	"/usr/lib",
}

// Resolve returns the host paths of the interpreter and every shared library
// that the programs need, directly or through other libraries, sorted.
func Resolve(programs []string, searchPath []string) ([]string, error) {
	seen := map[string]bool{}
	var out []string
	var walk func(file string) error
	walk = func(file string) error {
		f, err := elf.Open(file)
		if err != nil {
			return fmt.Errorf("open ELF %s: %w", file, err)
		}
		defer f.Close()
		if f.Machine != elf.EM_X86_64 {
			return fmt.Errorf("%s is for %v, not x86-64", file, f.Machine)
		}
		if interp := f.Progs; interp != nil {
			for _, p := range f.Progs {
				if p.Type != elf.PT_INTERP {
					continue
				}
				b := make([]byte, p.Filesz)
				if _, err := p.ReadAt(b, 0); err != nil {
					return fmt.Errorf("read interpreter of %s: %w", file, err)
				}
				ip := string(b)
				if n := len(ip); n > 0 && ip[n-1] == 0 {
					ip = ip[:n-1]
				}
				if !seen[ip] {
					seen[ip] = true
					out = append(out, ip)
				}
			}
		}
		libs, err := f.ImportedLibraries()
		if err != nil {
			return fmt.Errorf("read needed libraries of %s: %w", file, err)
		}
		for _, lib := range libs {
			found := ""
			for _, dir := range searchPath {
				cand := filepath.Join(dir, lib)
				if _, err := os.Stat(cand); err == nil {
					found = cand
					break
				}
			}
			if found == "" {
				return fmt.Errorf("%s needs %s, which is not in %v", file, lib, searchPath)
			}
			if seen[found] {
				continue
			}
			seen[found] = true
			out = append(out, found)
			if err := walk(found); err != nil {
				return err
			}
		}
		return nil
	}
	for _, p := range programs {
		if err := walk(p); err != nil {
			return nil, err
		}
	}
	sort.Strings(out)
	return out, nil
}

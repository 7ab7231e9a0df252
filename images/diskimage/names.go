package diskimage

import (
	"errors"
	"fmt"
	"strings"
)

// ErrName is returned for a path or volume label FAT32 cannot hold as
// given: this package writes upper-case 8.3 short names only.
var ErrName = errors.New("invalid FAT name")

// shortNameChars are the characters other than A-Z and 0-9 allowed in a
// FAT short name (Microsoft's FAT specification, section 6.1).
const shortNameChars = "!#$%&'()-@^_`{}~"

func validShortChar(c byte) bool {
	return c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte(shortNameChars, c) >= 0
}

// shortName returns the 11-byte directory-entry form of an upper-case 8.3
// name: a base of 1-8 characters, optionally a dot and an extension of 1-3.
func shortName(s string) ([11]byte, error) {
	var n [11]byte
	for i := range n {
		n[i] = ' '
	}
	base, ext, dotted := strings.Cut(s, ".")
	switch {
	case base == "":
		return n, fmt.Errorf("%w: %q has no base name", ErrName, s)
	case len(base) > 8:
		return n, fmt.Errorf("%w: %q: base name longer than 8 characters", ErrName, s)
	case dotted && (ext == "" || len(ext) > 3):
		return n, fmt.Errorf("%w: %q: extension not 1-3 characters", ErrName, s)
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c != '.' && !validShortChar(c) {
			if c >= 'a' && c <= 'z' {
				return n, fmt.Errorf("%w: %q: lower-case letter (only upper-case 8.3 names are written)", ErrName, s)
			}
			return n, fmt.Errorf("%w: %q: character %q not allowed in an 8.3 name", ErrName, s, c)
		}
	}
	if strings.Contains(ext, ".") {
		return n, fmt.Errorf("%w: %q: more than one dot", ErrName, s)
	}
	copy(n[:8], base)
	copy(n[8:], ext)
	return n, nil
}

// splitPath returns the short names of the components of a slash-separated
// path, with or without a leading slash.
func splitPath(p string) ([][11]byte, error) {
	parts := strings.Split(strings.TrimPrefix(p, "/"), "/")
	out := make([][11]byte, 0, len(parts))
	for _, c := range parts {
		if c == "" {
			return nil, fmt.Errorf("%w: path %q has an empty component", ErrName, p)
		}
		n, err := shortName(c)
		if err != nil {
			return nil, fmt.Errorf("path %q: %w", p, err)
		}
		out = append(out, n)
	}
	return out, nil
}

// noLabel is the boot sector's label of a volume without one.
var noLabel = [11]byte([]byte("NO NAME    "))

// volumeLabel returns the 11-byte form of a volume label: up to 11
// characters allowed in short names, or spaces; "" gives "NO NAME".
func volumeLabel(s string) ([11]byte, error) {
	l := noLabel
	if s == "" {
		return l, nil
	}
	if len(s) > len(l) || s[0] == ' ' {
		return l, fmt.Errorf("%w: volume label %q: 1-11 characters, not starting with a space", ErrName, s)
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c != ' ' && !validShortChar(c) {
			return l, fmt.Errorf("%w: volume label %q: character %q not allowed", ErrName, s, c)
		}
	}
	for i := range l {
		l[i] = ' '
	}
	copy(l[:], s)
	return l, nil
}

// displayName returns "NAME.EXT" for an 11-byte short name.
func displayName(n [11]byte) string {
	base := strings.TrimRight(string(n[:8]), " ")
	if ext := strings.TrimRight(string(n[8:]), " "); ext != "" {
		return base + "." + ext
	}
	return base
}

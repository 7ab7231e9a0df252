// Package objref is the one grammar of object names on the appliance, like
// restic's Handle: a repository, a restic object type and a name. Every
// object but a repository's config is content-addressed: its name is the
// SHA-256 of its content in lowercase hex. The config is the one named
// object ("<repo>/config", "config"). The store, the ingest and replication
// services and the image configuration all check names here.
package objref

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

// Errors callers branch on.
var (
	// ErrInvalid is a repository, type, namespace or name outside the
	// grammar.
	ErrInvalid = errors.New("invalid namespace or object name")
	// ErrHashMismatch is content whose SHA-256 is not its name.
	ErrHashMismatch = errors.New("content does not match the object name")
)

// Object types of a restic repository.
const (
	TypeData      = "data"
	TypeIndex     = "index"
	TypeKeys      = "keys"
	TypeLocks     = "locks"
	TypeSnapshots = "snapshots"
	TypeConfig    = "config"
)

// Types lists the object types in the order a repository is best copied
// in: the config and keys first, then data before the indexes and snapshots
// that refer to it, locks last.
var Types = []string{TypeConfig, TypeKeys, TypeData, TypeIndex, TypeSnapshots, TypeLocks}

// ConfigName is the name of a repository's config object.
const ConfigName = "config"

// MaxRepoLen bounds a repository name.
const MaxRepoLen = 64

// Ref names one object.
type Ref struct {
	Repo string
	Type string
	Name string
}

// Parse splits a namespace ("<repo>/<type>") and checks it with name.
func Parse(ns, name string) (Ref, error) {
	repo, typ, err := ParseNamespace(ns)
	if err != nil {
		return Ref{}, err
	}
	r := Ref{Repo: repo, Type: typ, Name: name}
	if err := CheckName(typ, name); err != nil {
		return Ref{}, err
	}
	return r, nil
}

// ParseNamespace splits and checks a namespace: "<repo>/<type>".
func ParseNamespace(ns string) (repo, typ string, err error) {
	repo, typ, ok := strings.Cut(ns, "/")
	if !ok || CheckRepo(repo) != nil || CheckType(typ) != nil {
		return "", "", fmt.Errorf("%w: namespace %q", ErrInvalid, ns)
	}
	return repo, typ, nil
}

// Namespace joins a repository and a type.
func Namespace(repo, typ string) string { return repo + "/" + typ }

// Validate checks every part of the reference.
func (r Ref) Validate() error {
	_, err := Parse(r.Namespace(), r.Name)
	return err
}

// Namespace is "<repo>/<type>", the store's folder of the object.
func (r Ref) Namespace() string { return Namespace(r.Repo, r.Type) }

// String is "<repo>/<type>/<name>".
func (r Ref) String() string { return r.Namespace() + "/" + r.Name }

// ContentAddressed reports whether the object is named by its SHA-256.
func (r Ref) ContentAddressed() bool { return ContentAddressed(r.Name) }

// CheckRepo checks a repository name: 1 to 64 lowercase letters, digits,
// dots, dashes and underscores, starting with a letter or digit, and no
// "..".
func CheckRepo(repo string) error {
	if len(repo) == 0 || len(repo) > MaxRepoLen || strings.Contains(repo, "..") {
		return fmt.Errorf("%w: repository %q", ErrInvalid, repo)
	}
	for i := 0; i < len(repo); i++ {
		c := repo[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case i > 0 && (c == '.' || c == '-' || c == '_'):
		default:
			return fmt.Errorf("%w: repository %q", ErrInvalid, repo)
		}
	}
	return nil
}

// CheckType checks an object type: one of Types.
func CheckType(typ string) error {
	for _, t := range Types {
		if typ == t {
			return nil
		}
	}
	return fmt.Errorf("%w: unknown object type %q", ErrInvalid, typ)
}

// CheckName checks an object name for its type: "config" for the config,
// a SHA-256 in lowercase hex for every other type.
func CheckName(typ, name string) error {
	if typ == TypeConfig {
		if name != ConfigName {
			return fmt.Errorf("%w: the config object is named %q, not %q", ErrInvalid, ConfigName, name)
		}
		return nil
	}
	if !ContentAddressed(name) {
		return fmt.Errorf("%w: object name %q is not a SHA-256", ErrInvalid, name)
	}
	return nil
}

// ContentAddressed reports whether name is a SHA-256 in lowercase hex.
func ContentAddressed(name string) bool {
	if len(name) != 2*sha256.Size {
		return false
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// Digest is the SHA-256 of data in lowercase hex: the name of a
// content-addressed object.
func Digest(data []byte) string {
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])
}

// CheckContent verifies a content-addressed object against its name. The
// config cannot be checked this way (the store keeps its digest).
func CheckContent(name string, data []byte) error {
	if !ContentAddressed(name) {
		return nil
	}
	if got := Digest(data); got != name {
		return fmt.Errorf("%w: content has SHA-256 %s, not %s", ErrHashMismatch, got, name)
	}
	return nil
}

// Package objectio reads uploaded objects with the checks both the ingest
// and the replication service need: a size bound, no truncated body, and a
// content-addressed name that matches the SHA-256 of the content.
package objectio

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"regexp"

	"github.com/dataembassy/embassy/appliance/store"
)

// Error is a refused upload with the HTTP status to answer.
type Error struct {
	Status int
	Msg    string
}

func (e *Error) Error() string { return e.Msg }

// DefaultMaxObject bounds an object (restic packs are 4-128 MiB).
const DefaultMaxObject = 160 << 20

// ReadObject reads an uploaded object of at most max bytes
// (DefaultMaxObject when max is 0) and checks a content-addressed name
// against it. A body longer than max or shorter than its Content-Length is
// refused.
func ReadObject(r *http.Request, name string, max int64) ([]byte, error) {
	if max == 0 {
		max = DefaultMaxObject
	}
	if r.ContentLength > max {
		return nil, &Error{http.StatusRequestEntityTooLarge, fmt.Sprintf("object of %d bytes exceeds %d", r.ContentLength, max)}
	}
	data, err := ReadLimited(r.Body, max)
	if err != nil {
		return nil, err
	}
	if r.ContentLength >= 0 && int64(len(data)) != r.ContentLength {
		return nil, &Error{http.StatusBadRequest, fmt.Sprintf("upload truncated: %d of %d bytes", len(data), r.ContentLength)}
	}
	return data, CheckContent(name, data)
}

// ReadLimited reads all of body, refusing more than max bytes.
func ReadLimited(body io.Reader, max int64) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(body, max+1))
	if err != nil {
		return nil, &Error{http.StatusBadRequest, fmt.Sprintf("read upload: %v", err)}
	}
	if int64(len(data)) > max {
		return nil, &Error{http.StatusRequestEntityTooLarge, fmt.Sprintf("object exceeds %d bytes", max)}
	}
	return data, nil
}

var contentAddressed = regexp.MustCompile(`^[0-9a-f]{64}$`)

// ContentAddressed reports whether name is a SHA-256 in lowercase hex.
func ContentAddressed(name string) bool { return contentAddressed.MatchString(name) }

// CheckContent verifies a content-addressed object against its name.
// Named objects ("config") cannot be checked this way.
func CheckContent(name string, data []byte) error {
	if !ContentAddressed(name) {
		return nil
	}
	sum := sha256.Sum256(data)
	if got := hex.EncodeToString(sum[:]); got != name {
		return &Error{http.StatusBadRequest, fmt.Sprintf("content has SHA-256 %s, not %s", got, name)}
	}
	return nil
}

// Fail makes an Error.
func Fail(status int, format string, args ...any) error {
	return &Error{status, fmt.Sprintf(format, args...)}
}

// Status maps an error of an object request to its HTTP status: an Error
// carries its own, the store's errors map to 404, 400 and 503, and a
// conflicting named object to conflict (ingest says 403: append-only;
// replication says 409). Anything else is a 500.
func Status(err error, conflict int) int {
	var oe *Error
	switch {
	case errors.As(err, &oe):
		return oe.Status
	case errors.Is(err, store.ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, store.ErrConflict):
		return conflict
	case errors.Is(err, store.ErrInvalidName), errors.Is(err, store.ErrHashMismatch):
		return http.StatusBadRequest
	case errors.Is(err, store.ErrNoHealthyDisk), errors.Is(err, store.ErrCorrupt):
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

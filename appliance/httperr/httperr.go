// Package httperr maps the errors of object requests to HTTP statuses, for
// the two servers that answer them (ingest and replication). The store and
// the object reader know nothing of HTTP; a handler's own refusals (no
// certificate, not allowed, wrong method) carry their status in an Error.
package httperr

import (
	"errors"
	"fmt"
	"net/http"

	"github.com/dataembassy/embassy/appliance/objectio"
	"github.com/dataembassy/embassy/appliance/objref"
	"github.com/dataembassy/embassy/appliance/store"
)

// Error is a handler's refusal with the HTTP status to answer.
type Error struct {
	Status int
	Err    error
}

func (e *Error) Error() string { return e.Err.Error() }

func (e *Error) Unwrap() error { return e.Err }

// New makes an Error; format may wrap an error with %w.
func New(status int, format string, args ...any) error {
	return &Error{Status: status, Err: fmt.Errorf(format, args...)}
}

// Status maps an error of an object request to its HTTP status: an Error
// carries its own; a bad name, a hash mismatch and a truncated or
// unreadable upload are 400; an object too large 413; a missing object 404;
// a store without a healthy disk or without a good copy, or an upload over
// the upload budget, 503; a full disk or a repository over its quota,
// 507; a conflicting
// named object is conflict (ingest says 403: append-only; replication says
// 409). Anything else is a 500.
func Status(err error, conflict int) int {
	var he *Error
	switch {
	case errors.As(err, &he):
		return he.Status
	case errors.Is(err, objectio.ErrTooLarge):
		return http.StatusRequestEntityTooLarge
	case errors.Is(err, objectio.ErrTruncated), errors.Is(err, objectio.ErrUnreadable),
		errors.Is(err, objref.ErrInvalid), errors.Is(err, objref.ErrHashMismatch):
		return http.StatusBadRequest
	case errors.Is(err, store.ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, store.ErrConflict):
		return conflict
	case errors.Is(err, store.ErrNoHealthyDisk), errors.Is(err, store.ErrCorrupt), errors.Is(err, objectio.ErrBusy):
		return http.StatusServiceUnavailable
	case errors.Is(err, store.ErrFull), errors.Is(err, store.ErrQuota):
		return http.StatusInsufficientStorage
	}
	return http.StatusInternalServerError
}

// Write answers err with status. An upload refused for the upload budget
// (objectio.ErrBusy) also says when to retry, which restic and the peers
// do.
func Write(w http.ResponseWriter, err error, status int) {
	if errors.Is(err, objectio.ErrBusy) {
		w.Header().Set("Retry-After", "1")
	}
	http.Error(w, err.Error(), status)
}

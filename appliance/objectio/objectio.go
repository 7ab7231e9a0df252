// Package objectio reads uploaded objects with the checks both the ingest
// and the replication service need before an object reaches the store: a
// size bound and no truncated body. It answers with sentinel errors; the
// HTTP servers map them to statuses (package httperr).
//
// The content is not hashed here: store.Put checks a content-addressed name
// against the SHA-256 of the content before any copy is renamed into place
// and answers objref.ErrHashMismatch, so one hash per upload suffices.
// Under the appliance's software SHA-256 a second one cost a sixth of the
// ingest path's CPU.
package objectio

import (
	"errors"
	"fmt"
	"io"
	"net/http"
)

// Errors callers branch on.
var (
	ErrTooLarge   = errors.New("object too large")
	ErrTruncated  = errors.New("upload truncated")
	ErrUnreadable = errors.New("upload unreadable")
)

// DefaultMaxObject bounds an object (restic packs are 4-128 MiB).
const DefaultMaxObject = 160 << 20

// ReadObject reads an uploaded object of at most max bytes
// (DefaultMaxObject when max is 0). A body longer than max or shorter than
// its Content-Length is refused. The caller stores it with store.Put, which
// checks the content against a content-addressed name.
func ReadObject(r *http.Request, max int64) ([]byte, error) {
	if max == 0 {
		max = DefaultMaxObject
	}
	if r.ContentLength > max {
		return nil, fmt.Errorf("%w: object of %d bytes exceeds %d", ErrTooLarge, r.ContentLength, max)
	}
	data, err := ReadLimited(r.Body, max)
	if err != nil {
		return nil, err
	}
	if r.ContentLength >= 0 && int64(len(data)) != r.ContentLength {
		return nil, fmt.Errorf("%w: %d of %d bytes", ErrTruncated, len(data), r.ContentLength)
	}
	return data, nil
}

// ReadLimited reads all of body, refusing more than max bytes.
func ReadLimited(body io.Reader, max int64) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(body, max+1))
	if err != nil {
		return nil, fmt.Errorf("%w: read upload: %w", ErrUnreadable, err)
	}
	if int64(len(data)) > max {
		return nil, fmt.Errorf("%w: object exceeds %d bytes", ErrTooLarge, max)
	}
	return data, nil
}

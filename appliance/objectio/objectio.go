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
	// ErrBusy is an upload refused because the bytes of the uploads held
	// in memory would pass the budget: answer 503 with Retry-After, the
	// client (restic, a peer) retries.
	ErrBusy = errors.New("too many upload bytes in flight; retry later")
)

// DefaultMaxObject bounds an object (restic packs are 4-128 MiB).
const DefaultMaxObject = 160 << 20

// ReadObject reads an uploaded object of at most max bytes
// (DefaultMaxObject when max is 0) into memory reserved from budget (nil:
// no budget). A body longer than max or shorter than its Content-Length is
// refused; an upload whose bytes do not fit the budget now is ErrBusy,
// before anything is read. An upload of unknown length reserves max. The
// caller stores the object with store.Put, which checks the content
// against a content-addressed name, and then calls release.
func ReadObject(r *http.Request, max int64, budget *Budget) (data []byte, release func(), err error) {
	if max == 0 {
		max = DefaultMaxObject
	}
	if r.ContentLength > max {
		return nil, nil, fmt.Errorf("%w: object of %d bytes exceeds %d", ErrTooLarge, r.ContentLength, max)
	}
	reserve := max
	if r.ContentLength >= 0 {
		reserve = r.ContentLength
	}
	release, err = budget.Reserve(reserve)
	if err != nil {
		return nil, nil, err
	}
	if r.ContentLength >= 0 {
		data, err = readExactly(r.Body, r.ContentLength)
	} else {
		data, err = ReadLimited(r.Body, max)
	}
	if err != nil {
		release()
		return nil, nil, err
	}
	return data, release, nil
}

// readExactly reads a body of the declared length into one buffer of that
// size (no growth, no copies) and refuses a body that is shorter or longer.
func readExactly(body io.Reader, n int64) ([]byte, error) {
	data := make([]byte, n)
	got, err := io.ReadFull(body, data)
	switch {
	case errors.Is(err, io.ErrUnexpectedEOF) || (errors.Is(err, io.EOF) && n > 0):
		return nil, fmt.Errorf("%w: %d of %d bytes", ErrTruncated, got, n)
	case err != nil:
		return nil, fmt.Errorf("%w: read upload: %w", ErrUnreadable, err)
	}
	var extra [1]byte
	if k, _ := body.Read(extra[:]); k > 0 {
		return nil, fmt.Errorf("%w: body longer than its Content-Length of %d", ErrTruncated, n)
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

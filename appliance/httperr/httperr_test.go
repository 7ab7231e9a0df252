package httperr

import (
	"errors"
	"fmt"
	"net/http"
	"testing"

	"github.com/dataembassy/embassy/appliance/objectio"
	"github.com/dataembassy/embassy/appliance/objref"
	"github.com/dataembassy/embassy/appliance/store"
)

func TestStatus(t *testing.T) {
	wrapped := func(err error) error { return fmt.Errorf("reg/data/abc: %w", err) }
	cases := []struct {
		name     string
		err      error
		conflict int
		want     int
	}{
		{"handler refusal", New(http.StatusUnauthorized, "no certificate"), http.StatusConflict, http.StatusUnauthorized},
		{"handler refusal wrapping a store error", New(http.StatusForbidden, "append-only: %w", store.ErrConflict), http.StatusConflict, http.StatusForbidden},
		{"too large", wrapped(objectio.ErrTooLarge), http.StatusConflict, http.StatusRequestEntityTooLarge},
		{"truncated", wrapped(objectio.ErrTruncated), http.StatusConflict, http.StatusBadRequest},
		{"unreadable", wrapped(objectio.ErrUnreadable), http.StatusConflict, http.StatusBadRequest},
		{"bad name", wrapped(objref.ErrInvalid), http.StatusConflict, http.StatusBadRequest},
		{"store's bad name", wrapped(store.ErrInvalidName), http.StatusConflict, http.StatusBadRequest},
		{"hash mismatch", wrapped(store.ErrHashMismatch), http.StatusConflict, http.StatusBadRequest},
		{"not found", wrapped(store.ErrNotFound), http.StatusConflict, http.StatusNotFound},
		{"conflict for replication", wrapped(store.ErrConflict), http.StatusConflict, http.StatusConflict},
		{"conflict for ingest", wrapped(store.ErrConflict), http.StatusForbidden, http.StatusForbidden},
		{"no healthy disk", wrapped(store.ErrNoHealthyDisk), http.StatusConflict, http.StatusServiceUnavailable},
		{"disk full", wrapped(store.ErrFull), http.StatusConflict, http.StatusInsufficientStorage},
		{"repository over its quota", wrapped(store.ErrQuota), http.StatusConflict, http.StatusInsufficientStorage},
		{"corrupt", wrapped(store.ErrCorrupt), http.StatusConflict, http.StatusServiceUnavailable},
		{"anything else", errors.New("disk on fire"), http.StatusConflict, http.StatusInternalServerError},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := Status(c.err, c.conflict); got != c.want {
				t.Fatalf("Status(%v) = %d, want %d", c.err, got, c.want)
			}
		})
	}
}

package objectio_test

import (
	"bytes"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/dataembassy/embassy/appliance/httperr"
	"github.com/dataembassy/embassy/appliance/objectio"
)

func TestReadObject(t *testing.T) {
	cases := []struct {
		name, body    string
		contentLength int64
		status        int
		err           error
	}{
		{"good", "payload", 7, 0, nil},
		{"unknown length", "anything", -1, 0, nil},
		{"exactly the bound", strings.Repeat("x", 16), 16, 0, nil},
		{"too large by header", "payload", 100, http.StatusRequestEntityTooLarge, objectio.ErrTooLarge},
		{"too large by body", strings.Repeat("x", 20), -1, http.StatusRequestEntityTooLarge, objectio.ErrTooLarge},
		{"truncated", "pay", 7, http.StatusBadRequest, objectio.ErrTruncated},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodPut, "/", strings.NewReader(tc.body))
			r.ContentLength = tc.contentLength
			got, err := objectio.ReadObject(r, 16)
			switch {
			case tc.status == 0 && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.status == 0 && !bytes.Equal(got, []byte(tc.body)):
				t.Fatalf("returned %q, want the uploaded %q", got, tc.body)
			case tc.status != 0 && (!errors.Is(err, tc.err) || httperr.Status(err, http.StatusConflict) != tc.status):
				t.Fatalf("got %v, want %v and status %d", err, tc.err, tc.status)
			}
		})
	}
}

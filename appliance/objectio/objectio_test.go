package objectio_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/dataembassy/embassy/appliance/httperr"
	"github.com/dataembassy/embassy/appliance/objectio"
	"github.com/dataembassy/embassy/appliance/objref"
)

func TestReadBodyAndCheckContent(t *testing.T) {
	sum := sha256.Sum256([]byte("payload"))
	good := hex.EncodeToString(sum[:])
	cases := []struct {
		name, objName, body string
		contentLength       int64
		status              int
		err                 error
	}{
		{"good", good, "payload", 7, 0, nil},
		{"named object", "config", "anything", 8, 0, nil},
		{"too large by header", good, "payload", 100, http.StatusRequestEntityTooLarge, objectio.ErrTooLarge},
		{"too large by body", good, strings.Repeat("x", 20), -1, http.StatusRequestEntityTooLarge, objectio.ErrTooLarge},
		{"truncated", good, "pay", 7, http.StatusBadRequest, objectio.ErrTruncated},
		{"wrong hash", strings.Repeat("0", 64), "payload", 7, http.StatusBadRequest, objref.ErrHashMismatch},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodPut, "/", strings.NewReader(tc.body))
			r.ContentLength = tc.contentLength
			got, err := objectio.ReadObject(r, tc.objName, 16)
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

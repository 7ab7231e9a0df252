package objectio

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestReadBodyAndCheckContent(t *testing.T) {
	sum := sha256.Sum256([]byte("payload"))
	good := hex.EncodeToString(sum[:])
	cases := []struct {
		name, objName, body string
		contentLength       int64
		status              int
	}{
		{"good", good, "payload", 7, 0},
		{"named object", "config", "anything", 8, 0},
		{"too large by header", good, "payload", 100, http.StatusRequestEntityTooLarge},
		{"too large by body", good, strings.Repeat("x", 20), -1, http.StatusRequestEntityTooLarge},
		{"truncated", good, "pay", 7, http.StatusBadRequest},
		{"wrong hash", strings.Repeat("0", 64), "payload", 7, http.StatusBadRequest},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodPut, "/", strings.NewReader(tc.body))
			r.ContentLength = tc.contentLength
			_, err := ReadObject(r, tc.objName, 16)
			var oe *Error
			switch {
			case tc.status == 0 && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.status != 0 && (!errors.As(err, &oe) || oe.Status != tc.status):
				t.Fatalf("got %v, want status %d", err, tc.status)
			}
		})
	}
}

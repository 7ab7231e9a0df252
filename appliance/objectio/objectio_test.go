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
		budget        int64 // 0: no budget
		held          int64 // bytes of the budget taken by another upload
		status        int
		err           error
	}{
		{"good", "payload", 7, 0, 0, 0, nil},
		{"unknown length", "anything", -1, 0, 0, 0, nil},
		{"exactly the bound", strings.Repeat("x", 16), 16, 0, 0, 0, nil},
		{"empty", "", 0, 0, 0, 0, nil},
		{"too large by header", "payload", 100, 0, 0, http.StatusRequestEntityTooLarge, objectio.ErrTooLarge},
		{"too large by body", strings.Repeat("x", 20), -1, 0, 0, http.StatusRequestEntityTooLarge, objectio.ErrTooLarge},
		{"truncated", "pay", 7, 0, 0, http.StatusBadRequest, objectio.ErrTruncated},
		{"longer than its length", "payload+more", 7, 0, 0, http.StatusBadRequest, objectio.ErrTruncated},
		{"fits the budget", "payload", 7, 10, 3, 0, nil},
		{"budget spent", "payload", 7, 10, 4, http.StatusServiceUnavailable, objectio.ErrBusy},
		{"unknown length reserves the bound", "payload", -1, 20, 5, http.StatusServiceUnavailable, objectio.ErrBusy},
		{"larger than the whole budget", "payload", 7, 5, 0, http.StatusRequestEntityTooLarge, objectio.ErrTooLarge},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var budget *objectio.Budget
			if tc.budget > 0 {
				budget = objectio.NewBudget(tc.budget)
				if tc.held > 0 {
					if _, err := budget.Reserve(tc.held); err != nil {
						t.Fatal(err)
					}
				}
			}
			r := httptest.NewRequest(http.MethodPut, "/", strings.NewReader(tc.body))
			r.ContentLength = tc.contentLength
			got, release, err := objectio.ReadObject(r, 16, budget)
			switch {
			case tc.status == 0 && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.status == 0 && !bytes.Equal(got, []byte(tc.body)):
				t.Fatalf("returned %q, want the uploaded %q", got, tc.body)
			case tc.status != 0 && (!errors.Is(err, tc.err) || httperr.Status(err, http.StatusConflict) != tc.status):
				t.Fatalf("got %v, want %v and status %d", err, tc.err, tc.status)
			}
			if err == nil {
				if budget != nil && budget.Used() != tc.held+int64(len(tc.body)) && tc.contentLength >= 0 {
					t.Fatalf("budget in use %d while holding the object, want %d", budget.Used(), tc.held+int64(len(tc.body)))
				}
				release()
				release()
			}
			if budget != nil && budget.Used() != tc.held {
				t.Fatalf("budget in use %d after release, want %d", budget.Used(), tc.held)
			}
		})
	}
}

func TestBusyAnswerSaysWhenToRetry(t *testing.T) {
	b := objectio.NewBudget(4)
	b.Reserve(4)
	r := httptest.NewRequest(http.MethodPut, "/", strings.NewReader("data"))
	_, _, err := objectio.ReadObject(r, 16, b)
	w := httptest.NewRecorder()
	httperr.Write(w, err, httperr.Status(err, http.StatusConflict))
	if w.Code != http.StatusServiceUnavailable || w.Header().Get("Retry-After") == "" {
		t.Fatalf("answer %d, Retry-After %q", w.Code, w.Header().Get("Retry-After"))
	}
}

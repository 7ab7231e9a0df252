package ingest_test

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"net/http"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestMetrics(t *testing.T) {
	f := start(t)
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: f.srvCAPool, Certificates: []tls.Certificate{f.certs["writer"]}}}}
	body := []byte("some pack")
	sum := sha256.Sum256(body)
	for _, name := range []string{hex.EncodeToString(sum[:]), "not-a-hash"} {
		resp, err := c.Post(f.url+"/population/data/"+name, "application/octet-stream", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(f.srv.Collectors()...)
	if n, err := testutil.GatherAndCount(reg); err != nil || n != 4 {
		t.Fatalf("%d series (%v), want 4", n, err)
	}
	cs := f.srv.Collectors()
	for i, want := range []float64{2, 1, float64(len(body))} {
		if got := testutil.ToFloat64(cs[i]); got != want {
			t.Errorf("%s = %v, want %v", []string{"requests", "rejected", "bytes"}[i], got, want)
		}
	}
}

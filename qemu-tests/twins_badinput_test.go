package qemutests

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dataembassy/embassy/broker/pki"
)

// TestIngestBadInput: against the appliance's ingest service (twin-a of
// the shared running pair), each bad request gets its error and changes
// nothing; the repository still passes restic check afterwards.
func TestIngestBadInput(t *testing.T) {
	requireE2E(t)
	_, _, a, _, _ := twinPair(t, 10*time.Minute)
	port := a.ports[0]

	rc := newResticClient(t, port, "population-registry")
	src := filepath.Join(sourceTree(t), "ethernet", "intel")
	initRepo(t, rc)
	if out, err := rc.run(t, "backup", src); err != nil {
		t.Fatalf("restic backup: %v\n%s", err, out)
	}

	roots := x509.NewCertPool()
	caPEM, _ := os.ReadFile(rc.caFile)
	roots.AppendCertsFromPEM(caPEM)
	writer, _ := tls.LoadX509KeyPair(rc.certFile, rc.certFile)
	foreignCA, _ := pki.NewRootCA("not the home state", time.Hour)
	fk, _ := pki.NewKey()
	fleaf, _ := foreignCA.Leaf("population-registry", nil, &fk.PublicKey, time.Hour)
	foreign := pki.TLSCertificate(fleaf, fk)
	client := func(cert *tls.Certificate) *http.Client {
		tc := &tls.Config{RootCAs: roots}
		if cert != nil {
			tc.Certificates = []tls.Certificate{*cert}
		}
		return &http.Client{Timeout: time.Minute, Transport: &http.Transport{TLSClientConfig: tc}}
	}
	base := fmt.Sprintf("https://127.0.0.1:%d", port)
	body := []byte("not a restic pack")
	sum := sha256.Sum256(body)
	name := hex.EncodeToString(sum[:])
	cases := []struct {
		name   string
		c      *http.Client
		method string
		path   string
		body   []byte
		status int
	}{
		{"no client certificate", client(nil), "GET", "/population/keys/", nil, 401},
		{"foreign client certificate", client(&foreign), "GET", "/population/keys/", nil, 401},
		{"repository of another client", client(&writer), "GET", "/cadastre/keys/", nil, 403},
		{"path traversal", client(&writer), "GET", "/population/../cadastre/config", nil, 400},
		{"unknown type", client(&writer), "GET", "/population/secrets/", nil, 404},
		{"bad object name", client(&writer), "GET", "/population/data/zz", nil, 400},
		{"wrong hash", client(&writer), "POST", "/population/data/" + strings.Repeat("ab", 32), body, 400},
		{"delete a snapshot", client(&writer), "DELETE", "/population/snapshots/" + name, nil, 403},
		{"delete the repository", client(&writer), "DELETE", "/population/", nil, 403},
		{"overwrite config", client(&writer), "POST", "/population/config", body, 403},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			req, _ := http.NewRequest(c.method, base+c.path, bytes.NewReader(c.body))
			resp, err := c.c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			msg, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != c.status {
				t.Fatalf("got %d %q, want %d", resp.StatusCode, msg, c.status)
			}
		})
	}
	t.Run("oversized body", func(t *testing.T) {
		conn, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port), &tls.Config{RootCAs: roots, Certificates: []tls.Certificate{writer}})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		fmt.Fprintf(conn, "POST /population/data/%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", strings.Repeat("cd", 32), 1<<30)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != http.StatusRequestEntityTooLarge {
			t.Fatalf("got %d, want 413", resp.StatusCode)
		}
	})
	// Health and metrics answer on the same listener, to monitors only: a
	// client certificate from the home-state client CA.
	monitor := ingestHTTP(t, "home-state-auditor")
	for path, want := range map[string]string{"/_embassy/health": `"degraded":false`, "/_embassy/metrics": "embassy_store_puts_total"} {
		for _, c := range []struct {
			who    string
			client *http.Client
			status int
		}{{"anyone", client(nil), http.StatusUnauthorized}, {"a monitor", monitor, http.StatusOK}} {
			resp, err := c.client.Get(base + path)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != c.status || (c.status == http.StatusOK) != strings.Contains(string(b), want) {
				t.Fatalf("%s from %s: %d %s", path, c.who, resp.StatusCode, b)
			}
		}
	}
	if out, err := rc.run(t, "check", "--read-data"); err != nil {
		t.Fatalf("restic check after bad requests: %v\n%s", err, out)
	}
}

package opclient

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/dataembassy/embassy/images/manifest"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/protocol/identity"
)

// UpgradeImage is an image folder's parts an upgrade needs (what
// `mkimage build` writes).
type UpgradeImage struct {
	Manifest, Signature, UKI []byte
	Version                  uint64
}

// LoadUpgradeImage reads manifest.json, manifest.sig and the UKI from an
// image folder, bounded; the manifest is parsed for its version (the
// brokers and the appliance check the signature).
func LoadUpgradeImage(dir string) (*UpgradeImage, error) {
	read := func(name string, limit int64) ([]byte, error) {
		f, err := os.Open(filepath.Join(dir, name))
		if err != nil {
			return nil, err
		}
		defer f.Close()
		b, err := io.ReadAll(io.LimitReader(f, limit+1))
		if err != nil {
			return nil, err
		}
		if int64(len(b)) > limit {
			return nil, fmt.Errorf("%s is larger than %d bytes", name, limit)
		}
		return b, nil
	}
	var img UpgradeImage
	var err error
	if img.Manifest, err = read(manifest.File, 1<<20); err != nil {
		return nil, err
	}
	if img.Signature, err = read(manifest.SignatureFile, 4096); err != nil {
		return nil, err
	}
	if img.UKI, err = read(manifest.ComponentUKI, api.MaxUpgradeUKI); err != nil {
		return nil, err
	}
	m, err := manifest.Parse(img.Manifest)
	if err != nil {
		return nil, err
	}
	img.Version = m.Version
	return &img, nil
}

// ErrUpgradeRefused is an appliance refusing a pushed image; the
// UpgradeResponse says why.
var ErrUpgradeRefused = errors.New("the appliance refused the upgrade")

// PushUpgrade pushes img to the appliance at addr (host:port of its
// ingest service) over TLS, believing the appliance's key only where ids
// agree (k brokers) and that it is appliance id, with client, a
// certificate of the home-state client CA. The appliance checks the
// image itself (signature, newer version, k approvals) and answers.
func PushUpgrade(ctx context.Context, addr, id string, img *UpgradeImage, client tls.Certificate, ids identity.Verifier) (*api.UpgradeResponse, error) {
	hc := &http.Client{Timeout: 5 * time.Minute, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		InsecureSkipVerify: true, // replaced by the agreement of k brokers
		Certificates:       []tls.Certificate{client},
		VerifyConnection: func(cs tls.ConnectionState) error {
			got, err := ids.Verify(cs.PeerCertificates, time.Now(), x509.ExtKeyUsageServerAuth)
			if err != nil {
				return err
			}
			if got.ID != id {
				return fmt.Errorf("%s is appliance %s, not %s", addr, got.ID, id)
			}
			return nil
		},
	}}}
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, "https://"+addr+api.PathUpgrade, bytes.NewReader(img.UKI))
	if err != nil {
		return nil, err
	}
	req.ContentLength = int64(len(img.UKI))
	req.Header.Set(api.HeaderUpgradeManifest, base64.StdEncoding.EncodeToString(img.Manifest))
	req.Header.Set(api.HeaderUpgradeSignature, base64.StdEncoding.EncodeToString(img.Signature))
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("appliance at %s: %w", addr, err)
	}
	defer resp.Body.Close()
	var out api.UpgradeResponse
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err := json.Unmarshal(body, &out); err != nil {
		return nil, fmt.Errorf("appliance at %s: %s: %.200s", addr, resp.Status, body)
	}
	if resp.StatusCode != http.StatusAccepted {
		return &out, fmt.Errorf("%w: %s: %s", ErrUpgradeRefused, resp.Status, out.Error)
	}
	return &out, nil
}

// UpgradeProgress is an appliance's upgrade as the brokers see it.
type UpgradeProgress struct {
	Broker  string `json:"broker"`
	Running uint64 `json:"running_version"` // the image of its last attestation here
	Pending uint64 `json:"pending_version,omitempty"`
	Floor   uint64 `json:"floor"`
	Error   string `json:"error,omitempty"`
}

// Progress reads, at every broker, the image the appliance last attested
// with, the version it staged and its floor.
func (c *Client) Progress(ctx context.Context, id string) []UpgradeProgress {
	var out []UpgradeProgress
	for _, st := range c.Status(ctx) {
		p := UpgradeProgress{Broker: st.Broker, Error: st.Error}
		if st.State != nil {
			p.Error = "appliance unknown here"
			for _, a := range st.State.Appliances {
				if a.ID != id {
					continue
				}
				p.Error, p.Running, p.Floor = "", a.LastImage, a.Floor
				if a.Health != nil && a.Health.Upgrade != nil {
					p.Pending = a.Health.Upgrade.Pending
				}
			}
		}
		out = append(out, p)
	}
	return out
}

// Upgraded reports whether at least k brokers saw the appliance attest on
// version and raised its floor to it.
func Upgraded(progress []UpgradeProgress, version uint64, k int) bool {
	n := 0
	for _, p := range progress {
		if p.Error == "" && p.Running == version && p.Floor >= version {
			n++
		}
	}
	return n >= k
}

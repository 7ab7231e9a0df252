package opclient

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"time"

	pb "github.com/google/go-tpm-tools/proto/tpm"

	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/protocol/identity"
	"github.com/dataembassy/embassy/tpm/eventlog"
	"github.com/dataembassy/embassy/tpm/pcrs"
	"github.com/dataembassy/embassy/tpm/verifier"
)

// Verdict is the outcome of an operator's remote attestation check.
type Verdict struct {
	Pass        bool   `json:"pass"`
	ApplianceID string `json:"appliance_id"`
	// VouchedBy are the brokers whose own CA issued a certificate for the
	// appliance's TLS key (k at least, or there is no verdict).
	VouchedBy       []string             `json:"vouched_by"`
	ImageVersion    uint64               `json:"image_version,omitempty"`
	UKIMatch        bool                 `json:"uki_match"`
	SecureBootMatch bool                 `json:"secure_boot_match"`
	CmdlineMatch    bool                 `json:"cmdline_match"`
	InitrdMatch     bool                 `json:"initrd_match"`
	SectionsMatch   bool                 `json:"sections_match"`
	Problems        []string             `json:"problems,omitempty"`
	ResetCount      uint32               `json:"reset_count"`
	RestartCount    uint32               `json:"restart_count"`
	LastAttestation map[string]time.Time `json:"last_attestation"`
}

// AttestAppliance asks the appliance at addr (host:port of its ingest
// service) for a fresh quote over a random nonce and verifies it: ids (k
// brokers, each through its own CA) agree on the TLS key and the appliance
// it names, the quote is
// signed by the AK the brokers enrolled and binds the nonce and the TLS key
// of this very connection, the event log replays to the quoted PCRs and
// the PCR4, PCR7, PCR9 and PCR11 events match an approved manifest.
func (c *Client) AttestAppliance(ctx context.Context, addr string, ids identity.Verifier) (*Verdict, error) {
	nonce := make([]byte, 32)
	rand.Read(nonce)
	var attested identity.Attested
	hc := &http.Client{Timeout: time.Minute, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		// The appliance is believed by agreement of k brokers, not by
		// any one CA: the standard check would accept one broker's word.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			var err error
			attested, err = ids.Verify(cs.PeerCertificates, time.Now(), x509.ExtKeyUsageServerAuth)
			return err
		},
	}}}
	body, _ := json.Marshal(api.ChallengeRequest{Nonce: nonce})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+addr+api.PathChallenge, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("appliance at %s: %w", addr, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("appliance at %s: %s: %s", addr, resp.Status, bytes.TrimSpace(data))
	}
	var ch api.ChallengeResponse
	if err := json.Unmarshal(data, &ch); err != nil {
		return nil, fmt.Errorf("decode evidence: %w", err)
	}
	leaf := resp.TLS.PeerCertificates[0]
	certID := attested.ID
	v := &Verdict{ApplianceID: certID, VouchedBy: attested.Brokers, LastAttestation: map[string]time.Time{}}
	if ch.ApplianceID != certID {
		v.Problems = append(v.Problems, fmt.Sprintf("appliance says it is %s but its certificate names %s", ch.ApplianceID, certID))
		return v, nil
	}
	tlsPub, err := x509.MarshalPKIXPublicKey(leaf.PublicKey)
	if err != nil {
		return nil, err
	}
	tlsHash := sha256.Sum256(tlsPub)

	// What the brokers know: the enrolled AK, approved images, last
	// attestations.
	var akPub []byte
	manifests := map[uint64]api.ApprovedManifest{}
	for _, st := range c.Status(ctx) {
		if st.Error != "" {
			v.Problems = append(v.Problems, "broker "+st.Broker+" unreachable: "+st.Error)
			continue
		}
		for _, m := range st.State.Manifests {
			manifests[m.Version] = m
		}
		for _, a := range st.State.Appliances {
			if a.ID != certID {
				continue
			}
			if a.Revoked {
				v.Problems = append(v.Problems, "revoked on broker "+st.Broker)
			}
			if akPub == nil {
				akPub = a.AKPublic
			} else if !bytes.Equal(akPub, a.AKPublic) {
				v.Problems = append(v.Problems, "brokers disagree on the appliance's AK")
			}
			v.LastAttestation[st.Broker] = a.LastAttestation
		}
	}
	if akPub == nil {
		v.Problems = append(v.Problems, "no broker knows appliance "+certID)
		return v, nil
	}
	ak, err := verifier.ParseAK(akPub)
	if err != nil {
		return nil, err
	}
	q := &pb.Quote{Quote: ch.Quote, RawSig: ch.Signature, Pcrs: pcrs.Proto(ch.PCRs)}
	info, err := verifier.VerifyQuote(ak, q, api.ExtraData(nonce, tlsHash[:]))
	if err != nil {
		v.Problems = append(v.Problems, "quote: "+err.Error())
		return v, nil
	}
	v.ResetCount, v.RestartCount = info.ResetCount, info.RestartCount
	events, err := eventlog.Replay(ch.EventLog, info.PCRs)
	if err != nil {
		v.Problems = append(v.Problems, err.Error())
		return v, nil
	}
	versions := make([]uint64, 0, len(manifests))
	for ver := range manifests {
		versions = append(versions, ver)
	}
	sort.Slice(versions, func(i, j int) bool { return versions[i] > versions[j] })
	for i, ver := range versions {
		check := eventlog.CheckBoot(events, manifests[ver].Measurements)
		if check.OK() || i == len(versions)-1 {
			v.UKIMatch, v.SecureBootMatch, v.CmdlineMatch, v.InitrdMatch, v.SectionsMatch =
				check.UKIMatch, check.SecureBootMatch, check.LoadOptionsMatch, check.InitrdMatch, check.SectionsMatch
			if check.OK() {
				v.ImageVersion = ver
				v.Pass = len(v.Problems) == 0
			} else {
				v.Problems = append(v.Problems, fmt.Sprintf("matches no approved image (compared with v%d: %v)", versions[0], eventlog.CheckBoot(events, manifests[versions[0]].Measurements).Problems))
			}
			break
		}
	}
	if len(versions) == 0 {
		v.Problems = append(v.Problems, "no approved image")
	}
	return v, nil
}

// PrintVerdict writes a verdict for people.
func PrintVerdict(w io.Writer, v *Verdict) {
	status := "PASS"
	if !v.Pass {
		status = "FAIL"
	}
	mark := func(ok bool) string {
		if ok {
			return "match"
		}
		return "DIFFERS"
	}
	fmt.Fprintf(w, "%s: appliance %s\n", status, v.ApplianceID)
	fmt.Fprintf(w, "  TLS key vouched for by brokers: %s\n", strings.Join(v.VouchedBy, ", "))
	if v.ImageVersion != 0 {
		fmt.Fprintf(w, "  image version   %d\n", v.ImageVersion)
	}
	fmt.Fprintf(w, "  UKI (PCR4)          %s\n  Secure Boot (PCR7)  %s\n  cmdline (PCR9)      %s\n  initrd (PCR9)       %s\n  UKI sections (PCR11) %s\n",
		mark(v.UKIMatch), mark(v.SecureBootMatch), mark(v.CmdlineMatch), mark(v.InitrdMatch), mark(v.SectionsMatch))
	fmt.Fprintf(w, "  TPM resetCount  %d (restartCount %d)\n", v.ResetCount, v.RestartCount)
	brokers := make([]string, 0, len(v.LastAttestation))
	for b := range v.LastAttestation {
		brokers = append(brokers, b)
	}
	sort.Strings(brokers)
	for _, b := range brokers {
		t := v.LastAttestation[b]
		ago := "never"
		if !t.IsZero() {
			ago = time.Since(t).Round(time.Second).String() + " ago"
		}
		fmt.Fprintf(w, "  last attestation with %s: %s\n", b, ago)
	}
	for _, p := range v.Problems {
		fmt.Fprintf(w, "  problem: %s\n", p)
	}
}

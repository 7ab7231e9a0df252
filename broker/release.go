package broker

import (
	"crypto/x509"
	"net"
	"net/http"
	"strconv"

	"google.golang.org/protobuf/proto"

	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/protocol/identity"
	"github.com/dataembassy/embassy/tpm/pcrs"
	"github.com/dataembassy/embassy/tpm/verifier"
)

// Attest verifies an appliance's evidence and, if everything holds,
// releases its shares sealed to its EK and the expected PCR values
// (expectedPCRs), and a TLS certificate for the key bound in the quote.
func (b *Broker) Attest(req *api.AttestRequest) (_ *api.AttestResponse, err error) {
	detail := map[string]string{}
	defer func() {
		b.metrics.attested(err)
		if err != nil {
			b.record(audit.ApplianceActor(req.ApplianceID), "attest", req.ApplianceID, err, detail)
		}
	}()
	if err := b.checkRequest(req); err != nil {
		return nil, err
	}
	// The appliance's lock from the first read of its record to the
	// commit: the record verified is the one updated and the one whose
	// firmware reference and standing the shares are sealed under, read
	// and decoded once. Other appliances' attestations proceed meanwhile,
	// and their commits are batched with this one's.
	defer b.records.lock(req.ApplianceID)()
	v, err := b.verify(req, detail)
	if err != nil {
		return nil, err
	}
	return b.release(req, v, detail)
}

// release answers a verified attestation: a certificate for the TLS key
// bound in the quote, and every deposited share sealed to the appliance's
// EK and the expected PCR values. The anti-rollback counters and the audit entries
// are durable before anything is returned. The caller holds the
// appliance's lock, taken before verify read the record.
func (b *Broker) release(req *api.AttestRequest, v *verified, detail map[string]string) (*api.AttestResponse, error) {
	r, info, matched := v.rec, v.quote, v.image
	tlsPub, perr := x509.ParsePKIXPublicKey(req.TLSPublic)
	if perr != nil {
		return nil, reject(http.StatusBadRequest, ReasonBadRequest, "TLS key: "+perr.Error())
	}
	names := []string{r.ID + identity.DNSSuffix}
	if len(req.TLSAddresses) > 8 {
		return nil, reject(http.StatusBadRequest, ReasonBadRequest, "more than 8 TLS addresses")
	}
	for _, a := range req.TLSAddresses {
		if net.ParseIP(a) == nil {
			return nil, reject(http.StatusBadRequest, ReasonBadRequest, "TLS address "+strconv.Quote(a)+" is not an IP address")
		}
		names = append(names, a)
	}
	certDER, certExpires, err := b.cfg.ServiceCA.LeafDER(r.ID, names, tlsPub, b.cfg.CertTTL)
	if err != nil {
		return nil, err
	}
	ekPub, err := x509.ParsePKIXPublicKey(r.EKPublic)
	if err != nil {
		return nil, err
	}
	resp := &api.AttestResponse{
		ImageVersion:  matched.Version,
		Certificate:   [][]byte{certDER, b.cfg.ServiceCA.Cert.Raw},
		CertExpires:   certExpires,
		ReattestAfter: int(b.cfg.ReattestAfter.Seconds()),
	}
	expected, err := expectedPCRs(r, info.PCRs)
	if err != nil {
		return nil, err
	}
	for _, disk := range r.Disks {
		share, err := b.loadShare(r.ID, disk)
		if err != nil {
			return nil, err
		}
		blob, err := verifier.Seal(ekPub, share, expected)
		clear(share)
		if err != nil {
			return nil, err
		}
		enc, err := proto.Marshal(blob)
		if err != nil {
			return nil, err
		}
		resp.Shares = append(resp.Shares, api.SealedShare{DiskID: disk, Blob: enc})
	}
	if locked := b.lockedDisks(r, req.Disks); locked != "" {
		detail["locked_disks"] = locked
	}
	resp.DiskApprovals = r.DiskApprovals
	resp.Peers = b.peers.except(r.ID)
	if ms, err := b.approvedManifests(); err == nil {
		for _, m := range ms[:min(len(ms), api.MaxApprovedImages)] {
			resp.Approved = append(resp.Approved, api.ApprovedImage{Version: m.Version, UKIAuthenticode: m.Measurements.UKIAuthenticode})
		}
	}
	if req.Health != nil {
		h := *req.Health
		h.Reported = b.now().UTC()
		r.Health = &h
	}
	// A boot that matches the reference again makes a pending firmware
	// change stale.
	r.PendingFirmware = nil
	r.SeenQuote, r.ResetCount, r.RestartCount = true, info.ResetCount, info.RestartCount
	r.LastAttest, r.LastImage = b.now().Unix(), matched.Version
	by := audit.ApplianceActor(r.ID)
	entries := []audit.Entry{entry(by, "attest", r.ID, nil, detail)}
	// An appliance that runs a newer image than its floor, committed (booted
	// from its default slot, not a one-shot trial: its own health report,
	// made by the attested image, says so), raises the floor to it: the
	// older image never gets keys here again. A trial boot raises nothing,
	// so a trial that fails, or a cut before the commit, falls back to an
	// image that still gets keys.
	if up := committedVersion(req.Health); matched.Version > r.Floor && up == matched.Version {
		entries = append(entries, entry(by, "raise-floor", r.ID, nil, map[string]string{
			"from": strconv.FormatUint(r.Floor, 10), "to": strconv.FormatUint(matched.Version, 10), "why": "attested on a newer image"}))
		r.Floor = matched.Version
	}
	resp.Floor = r.Floor
	if len(resp.Shares) > 0 {
		disks := ""
		for i, s := range resp.Shares {
			if i > 0 {
				disks += ","
			}
			disks += s.DiskID
		}
		entries = append(entries, entry(by, "release", r.ID, nil, map[string]string{"disks": disks, "image_version": detail["image_version"]}))
	}
	// The record (anti-rollback counters) and the audit entries are durable
	// before anything is released.
	if err := b.commit(r, entries...); err != nil {
		return nil, err
	}
	b.metrics.released.Add(float64(len(resp.Shares)))
	return resp, nil
}

// expectedPCRs is the PCR policy a share is sealed to, over exactly the
// policy selection: the firmware reference for the platform PCRs and the
// verified (replayed, image-checked) quote for the others. It is what the
// broker expects, never the request's own map. The record is the one
// read under the appliance's lock, held from before the verification to
// the commit, so no reference can change in between.
func expectedPCRs(r *record, verified map[int][]byte) (map[int][]byte, error) {
	if r.Firmware == nil {
		return nil, reject(http.StatusForbidden, ReasonFirmware, "no firmware reference")
	}
	out := map[int][]byte{}
	for _, i := range pcrs.Indexes() {
		v := verified[i]
		if pcrs.IsPlatform(i) {
			v = r.Firmware.PCRs[i]
		}
		out[i] = v
	}
	if err := pcrs.Check(out); err != nil {
		return nil, err
	}
	return out, nil
}

// committedVersion is the image version an appliance's health report says
// it runs from its committed slot, or 0 (no report, a trial boot).
func committedVersion(h *api.Health) uint64 {
	if h == nil || h.Upgrade == nil || h.Upgrade.Trial {
		return 0
	}
	return h.Upgrade.Running
}

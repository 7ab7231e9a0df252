package broker

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strconv"

	pb "github.com/google/go-tpm-tools/proto/tpm"
	bolt "go.etcd.io/bbolt"

	"github.com/dataembassy/embassy/images/manifest"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/eventlog"
	"github.com/dataembassy/embassy/tpm/pcrs"
	"github.com/dataembassy/embassy/tpm/verifier"
)

// approvedManifests returns the approved manifests, newest first. They are
// verified once when loaded from the database and kept until the next
// approval.
func (b *Broker) approvedManifests() ([]*manifest.Manifest, error) {
	b.manifestMu.Lock()
	defer b.manifestMu.Unlock()
	if b.manifests != nil {
		return b.manifests, nil
	}
	var out []*manifest.Manifest
	err := b.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketManifests).ForEach(func(_, v []byte) error {
			var mr manifestRecord
			if err := jsonUnmarshal(v, &mr); err != nil {
				return err
			}
			// Re-verify: the database is not trusted more than the wire.
			// One that no longer verifies (an older manifest schema, or an
			// edited database) counts as not approved: fewer approvals can
			// only mean fewer releases. Operators see why in the log.
			m, err := manifest.Verify(mr.Manifest, mr.Signature, b.cfg.ImageKey)
			if err != nil {
				b.cfg.Log.Error(MsgManifestIgnored, "err", err.Error())
				return nil
			}
			out = append(out, m)
			return nil
		})
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Version > out[j].Version })
	if err != nil {
		return nil, err
	}
	if out == nil {
		out = []*manifest.Manifest{}
	}
	b.manifests = out
	return out, nil
}

// checkedPCRs says, in every successful attestation's audit entry, what
// was compared with what.
var checkedPCRs = fmt.Sprintf("firmware reference %s; image manifest %s; empty %s",
	joinInts(pcrs.Platform()), joinInts(eventlog.ImagePCRs), joinInts(eventlog.EmptyPCRs))

// verified is what a verified attestation established: the appliance's
// record as it was read, the quote's PCRs and clock, and the approved image
// its event log matched.
type verified struct {
	rec   *record
	quote *verifier.QuoteInfo
	image *manifest.Manifest
}

// checkRequest checks an attestation request's shape and takes its nonce,
// before anything is read for the appliance.
func (b *Broker) checkRequest(req *api.AttestRequest) error {
	if api.CheckApplianceID(req.ApplianceID) != nil || len(req.Nonce) != 32 || len(req.TLSPublic) == 0 || len(req.TLSPublic) > 4096 {
		return reject(http.StatusBadRequest, ReasonBadRequest, "appliance id, nonce or TLS key")
	}
	if req.Health != nil {
		if herr := req.Health.Validate(); herr != nil {
			return reject(http.StatusBadRequest, ReasonBadRequest, herr.Error())
		}
	}
	if len(req.Disks) > api.MaxRequestDisks {
		return reject(http.StatusBadRequest, ReasonBadRequest, "more than "+strconv.Itoa(api.MaxRequestDisks)+" disks")
	}
	for _, d := range req.Disks {
		if api.CheckDiskID(d) != nil {
			return reject(http.StatusBadRequest, ReasonBadRequest, "disk id")
		}
	}
	if rj := b.takeNonce(req.ApplianceID, req.Nonce); rj != nil {
		return rj
	}
	return nil
}

// verify checks an appliance's evidence (after checkRequest, under the
// appliance's lock), in order: the appliance's standing (known, activated, enrolled, not
// revoked), the quote (AK signature, PCR digest, binding of nonce and TLS
// key), the TPM clock and its anti-rollback counters, the event log's
// replay, the platform PCRs against the firmware reference, an approved
// image and the floor. detail collects what the audit
// entry reports.
func (b *Broker) verify(req *api.AttestRequest, detail map[string]string) (*verified, error) {
	r, err := b.load(req.ApplianceID)
	if err != nil {
		return nil, err
	}
	switch {
	case r.Revoked:
		return nil, revoked()
	case !r.Activated:
		return nil, reject(http.StatusForbidden, ReasonNotActivated, "")
	case !r.Enrolled:
		return nil, reject(http.StatusForbidden, ReasonNotEnrolled, "")
	}
	ak, err := verifier.ParseAK(r.AKPublic)
	if err != nil {
		return nil, err
	}
	if perr := pcrs.Check(req.PCRs); perr != nil {
		return nil, reject(http.StatusBadRequest, ReasonBadRequest, perr.Error())
	}
	q := &pb.Quote{Quote: req.Quote, RawSig: req.Signature, Pcrs: pcrs.Proto(req.PCRs)}
	tlsHash := sha256.Sum256(req.TLSPublic)
	info, qerr := verifier.VerifyQuote(ak, q, api.ExtraData(req.Nonce, tlsHash[:]))
	switch {
	case errors.Is(qerr, verifier.ErrPCRDigest):
		return nil, reject(http.StatusForbidden, ReasonPCRDigest, qerr.Error())
	case errors.Is(qerr, verifier.ErrExtraData):
		return nil, reject(http.StatusForbidden, ReasonBinding, "")
	case qerr != nil:
		return nil, reject(http.StatusForbidden, ReasonQuote, qerr.Error())
	}
	detail["reset_count"] = strconv.FormatUint(uint64(info.ResetCount), 10)
	detail["restart_count"] = strconv.FormatUint(uint64(info.RestartCount), 10)
	if !info.Safe {
		return nil, reject(http.StatusForbidden, ReasonClock, "")
	}
	if r.SeenQuote && (info.ResetCount < r.ResetCount || (info.ResetCount == r.ResetCount && info.RestartCount < r.RestartCount)) {
		return nil, reject(http.StatusForbidden, ReasonRollback,
			fmt.Sprintf("quote has reset %d restart %d, broker saw reset %d restart %d", info.ResetCount, info.RestartCount, r.ResetCount, r.RestartCount))
	}
	events, rerr := eventlog.Replay(req.EventLog, info.PCRs)
	if rerr != nil {
		return nil, reject(http.StatusForbidden, ReasonReplay, rerr.Error())
	}
	if ferr := b.checkFirmware(r, info.PCRs, events, detail); ferr != nil {
		return nil, ferr
	}
	manifests, err := b.approvedManifests()
	if err != nil {
		return nil, err
	}
	var matched *manifest.Manifest
	var problems []string
	for _, m := range manifests {
		c := eventlog.CheckBoot(events, m.Measurements)
		if c.OK() {
			matched = m
			break
		}
		problems = append(problems, fmt.Sprintf("v%d: %v", m.Version, c.Problems))
	}
	if matched == nil {
		return nil, reject(http.StatusForbidden, ReasonImage, bounded(problems, 4*maxDetail))
	}
	detail["image_version"] = strconv.FormatUint(matched.Version, 10)
	detail["checked_pcrs"] = checkedPCRs
	if matched.Version < r.Floor {
		return nil, reject(http.StatusForbidden, ReasonFloor, fmt.Sprintf("image %d, floor %d", matched.Version, r.Floor))
	}
	return &verified{rec: r, quote: info, image: matched}, nil
}

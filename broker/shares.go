package broker

import (
	"fmt"
	"net/http"

	bolt "go.etcd.io/bbolt"

	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/keys/shamir"
	"github.com/dataembassy/embassy/protocol/api"
)

func shareKey(id, disk string) []byte { return []byte(id + "/" + disk) }

func (b *Broker) loadShare(id, disk string) ([]byte, error) {
	var sealed []byte
	err := b.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketShares).Get(shareKey(id, disk))
		if v == nil {
			return fmt.Errorf("share for disk %s missing", disk)
		}
		sealed = append([]byte(nil), v...)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return b.sealer.Open(sealed, shareKey(id, disk))
}

// Deposit stores this broker's share of a new disk's key. applianceID comes
// from the attested client certificate the request arrived with.
func (b *Broker) Deposit(applianceID string, req *api.DepositRequest) (err error) {
	defer func() {
		b.record(audit.ApplianceActor(applianceID), "deposit", applianceID, err, map[string]string{"disk": req.DiskID})
	}()
	if api.CheckDiskID(req.DiskID) != nil {
		return reject(http.StatusBadRequest, ReasonBadRequest, "disk id")
	}
	if _, perr := shamir.Parse(req.Share); perr != nil {
		return reject(http.StatusBadRequest, ReasonBadRequest, "share: "+perr.Error())
	}
	defer b.records.lock(applianceID)()
	r, err := b.load(applianceID)
	if err != nil {
		return err
	}
	switch {
	case r.Revoked:
		return revoked()
	case !r.Enrolled:
		return reject(http.StatusForbidden, ReasonNotEnrolled, "")
	case r.DiskApprovals < 1:
		return reject(http.StatusForbidden, ReasonNoDiskApproval, "")
	}
	for _, d := range r.Disks {
		if d == req.DiskID {
			return reject(http.StatusConflict, ReasonDiskExists, "")
		}
	}
	sealed, err := b.sealer.Seal(req.Share, shareKey(r.ID, req.DiskID))
	if err != nil {
		return err
	}
	r.DiskApprovals--
	r.Disks = append(r.Disks, req.DiskID)
	return b.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketShares).Put(shareKey(r.ID, req.DiskID), sealed); err != nil {
			return err
		}
		return b.putRecord(tx, r)
	})
}

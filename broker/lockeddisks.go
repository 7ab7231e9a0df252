package broker

import (
	"slices"
	"strings"

	bolt "go.etcd.io/bbolt"
)

// Why a disk an appliance listed gets no key from this broker, as the
// attest entry's "locked_disks" detail says it ("<disk>: <why> <owner>").
const (
	// DiskSharesDestroyed: the disk was another (revoked) appliance's and
	// an operator destroyed its shares; it can never be opened again.
	DiskSharesDestroyed = "shares destroyed with appliance"
	// DiskOfAnother: the disk holds another appliance's data.
	DiskOfAnother = "disk of appliance"
	// DiskUnknown: no share of the disk was ever deposited here.
	DiskUnknown = "no share deposited here"
)

// lockedDisks says, for each disk listed by the appliance r that r holds
// no share of here, why ("" when there is none). Other appliances'
// records are read only in that case: a disk moved between servers.
func (b *Broker) lockedDisks(r *record, listed []string) string {
	var missing []string
	for _, d := range listed {
		if !slices.Contains(r.Disks, d) && !slices.Contains(missing, d) {
			missing = append(missing, d)
		}
	}
	if len(missing) == 0 {
		return ""
	}
	why := map[string]string{}
	err := b.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketAppliances).ForEach(func(_, v []byte) error {
			var o record
			if err := jsonUnmarshal(v, &o); err != nil {
				return err
			}
			for _, d := range missing {
				switch {
				case o.ID == r.ID && slices.Contains(o.DestroyedDisks, d):
					why[d] = DiskSharesDestroyed + " " + o.ID
				case o.ID == r.ID:
				case slices.Contains(o.Disks, d):
					why[d] = DiskOfAnother + " " + o.ID
				case slices.Contains(o.DestroyedDisks, d):
					why[d] = DiskSharesDestroyed + " " + o.ID
				}
			}
			return nil
		})
	})
	parts := make([]string, 0, len(missing))
	for _, d := range missing {
		w, ok := why[d]
		switch {
		case err != nil:
			w = "records unreadable: " + err.Error()
		case !ok:
			w = DiskUnknown
		}
		parts = append(parts, d+": "+w)
	}
	return strings.Join(parts, "; ")
}

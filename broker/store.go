package broker

import (
	"encoding/json"
	"fmt"

	bolt "go.etcd.io/bbolt"

	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/protocol/api"
)

// Buckets of the broker database.
var (
	bucketAppliances  = []byte("appliances")
	bucketEnrollments = []byte("enrollments")
	bucketManifests   = []byte("manifests")
	bucketShares      = []byte("shares")
	bucketMeta        = []byte("meta")
	keyAuditHead      = []byte("audit-head")
)

// record is what the broker keeps per appliance.
type record struct {
	ID            string   `json:"id"`
	EKPublic      []byte   `json:"ek_public"`
	EKCert        []byte   `json:"ek_cert"`
	AKPublic      []byte   `json:"ak_public"`
	Activated     bool     `json:"activated"`
	Enrolled      bool     `json:"enrolled"`
	Revoked       bool     `json:"revoked"`
	Floor         uint64   `json:"floor"`
	DiskApprovals int      `json:"disk_approvals"`
	Disks         []string `json:"disks"`
	// DestroyedDisks are the disks whose shares an operator destroyed
	// (after the revocation): kept to say why they stay locked.
	DestroyedDisks []string `json:"destroyed_disks,omitempty"`
	ResetCount     uint32   `json:"reset_count"`
	RestartCount   uint32   `json:"restart_count"`
	SeenQuote      bool     `json:"seen_quote"`
	LastAttest     int64    `json:"last_attest_unix"`
	LastImage      uint64   `json:"last_image"`
	Endpoints      []string `json:"endpoints,omitempty"`
	// Health is the appliance's last self-report (informational).
	Health *api.Health `json:"health,omitempty"`
	// Challenge is the credential-activation secret while enrollment is
	// pending; cleared once activated.
	Challenge []byte `json:"challenge,omitempty"`
	// Firmware is the platform PCRs' reference, recorded at activation or
	// adopted by approve-firmware; nil for an appliance activated before
	// brokers recorded one (it is refused until an operator approves).
	Firmware *firmware `json:"firmware,omitempty"`
	// PendingFirmware is the first boot refused for the firmware reason
	// since the last approval, for approve-firmware to adopt.
	PendingFirmware *firmware `json:"pending_firmware,omitempty"`
}

// manifestRecord is an approved manifest with its signature.
type manifestRecord struct {
	Manifest  []byte `json:"manifest"`
	Signature []byte `json:"signature"`
	Approved  int64  `json:"approved_unix"`
}

func getJSON(tx *bolt.Tx, bucket, key []byte, v any) (bool, error) {
	b := tx.Bucket(bucket).Get(key)
	if b == nil {
		return false, nil
	}
	if err := json.Unmarshal(b, v); err != nil {
		return false, fmt.Errorf("decode %s/%s: %w", bucket, key, err)
	}
	return true, nil
}

func putJSON(tx *bolt.Tx, bucket, key []byte, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return tx.Bucket(bucket).Put(key, b)
}

func openDB(path string) (*bolt.DB, error) {
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		return nil, fmt.Errorf("open broker database: %w", err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketAppliances, bucketEnrollments, bucketManifests, bucketShares, bucketMeta} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, err
	}
	return db, nil
}

func auditHead(db *bolt.DB) (audit.Head, error) {
	var h audit.Head
	err := db.View(func(tx *bolt.Tx) error {
		_, err := getJSON(tx, bucketMeta, keyAuditHead, &h)
		return err
	})
	return h, err
}

// ShareSealer encrypts key shares at rest under the broker master key:
// seal.FileKey (a key in the state folder) or hsm.Sealer (a non-extractable
// key in a PKCS#11 token). aad binds a share to its appliance and disk.
// Open must refuse, with an error, a record another backend sealed.
type ShareSealer interface {
	Seal(plain, aad []byte) ([]byte, error)
	Open(sealed, aad []byte) ([]byte, error)
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

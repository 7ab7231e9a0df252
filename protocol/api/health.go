package api

import (
	"fmt"
	"time"
)

// Health is what an appliance reports about itself at each attestation.
type Health struct {
	Degraded bool         `json:"degraded"`
	Disks    []DiskHealth `json:"disks,omitempty"`
	// BlankDisks are inserted disks waiting for an operator's approve-disk.
	BlankDisks []DiskHealth `json:"blank_disks,omitempty"`
	Peers      []PeerHealth `json:"peers,omitempty"`
	// Upgrade is the image the appliance runs and one it staged.
	Upgrade  *UpgradeHealth `json:"upgrade,omitempty"`
	Reported time.Time      `json:"reported"`
}

// DiskHealth is one disk of an appliance.
type DiskHealth struct {
	Serial     string `json:"serial"`
	Device     string `json:"device,omitempty"`
	UUID       string `json:"uuid,omitempty"`
	State      string `json:"state"`
	Reason     string `json:"reason,omitempty"`
	ReadErrors int64  `json:"read_errors"`
	Healed     int64  `json:"healed"`
}

// PeerHealth is the replication lag towards one peer.
type PeerHealth struct {
	ID             string  `json:"id"`
	Path           string  `json:"path,omitempty"` // endpoint in use
	PendingObjects int     `json:"pending_objects"`
	PendingBytes   int64   `json:"pending_bytes"`
	OldestSeconds  float64 `json:"oldest_pending_seconds"`
	LastError      string  `json:"last_error,omitempty"`
}

// MaxHealthItems bounds each list in a health report.
const MaxHealthItems = 64

// Validate bounds a health report.
func (h *Health) Validate() error {
	if len(h.Disks) > MaxHealthItems || len(h.BlankDisks) > MaxHealthItems || len(h.Peers) > MaxHealthItems {
		return fmt.Errorf("health report lists more than %d items", MaxHealthItems)
	}
	return nil
}

package api

// PathUpgrade is the appliance's own endpoint (on its ingest listener)
// where an operator pushes an image upgrade: a PUT whose body is the
// signed UKI (at most MaxUpgradeUKI bytes, Content-Length required), with
// the manifest and its detached signature, base64, in the
// HeaderUpgradeManifest and HeaderUpgradeSignature headers. The appliance
// answers UpgradeResponse: 202 once the image is staged (it then reboots
// into it at a quiet moment), or an error saying why it refused.
const PathUpgrade = "/_embassy/upgrade"

// Upgrade push headers.
const (
	HeaderUpgradeManifest  = "Embassy-Manifest"
	HeaderUpgradeSignature = "Embassy-Manifest-Signature"
)

// MaxUpgradeUKI bounds a pushed UKI (the boot slot's limit).
const MaxUpgradeUKI = 24 << 20

// UpgradeResponse is the appliance's answer to a push.
type UpgradeResponse struct {
	ApplianceID string `json:"appliance_id"`
	Running     uint64 `json:"running_version"`
	Staged      uint64 `json:"staged_version,omitempty"`
	// ApprovedAt are the brokers that list the pushed image as approved.
	ApprovedAt []string `json:"approved_at,omitempty"`
	State      string   `json:"state"` // "staged", or "refused"
	Error      string   `json:"error,omitempty"`
}

// UpgradeHealth is an appliance's upgrade in its health report.
type UpgradeHealth struct {
	Running uint64 `json:"running_version"`
	Pending uint64 `json:"pending_version,omitempty"` // staged, not yet booted
	// Trial says the running image was booted once from the trial slot
	// and is not committed yet: the brokers raise no floor for it.
	Trial bool   `json:"trial,omitempty"`
	State string `json:"state,omitempty"`
}

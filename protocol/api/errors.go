package api

// ReasonUnknownAppliance is the refusal an appliance that was never
// enrolled gets; it then asks to enroll.
const ReasonUnknownAppliance = "unknown appliance"

// Error is the body of every non-2xx answer.
type Error struct {
	Error string `json:"error"`
	// Lockdown tells an appliance to stop serving and drop its keys.
	Lockdown bool `json:"lockdown,omitempty"`
}

// Package logmsg is the vocabulary of the appliance's console log: the
// messages of embassy-init's JSON log lines that the host side (the QEMU
// tests, the boot report and the demo) waits for. It imports nothing, so
// the host side can name the messages without linking PID 1.
package logmsg

// Boot: start, measured-boot evidence, a fatal error.
const (
	MsgStarting      = "embassy-init starting"
	MsgEvidence      = "measured boot evidence"
	MsgEventLogChunk = "event log chunk"
	MsgHalted        = "halted"
)

// ChunkSize is how many base64 characters of the event log go in one log line.
const ChunkSize = 3000

// MsgNetworkUp reports a NIC configured by DHCP, with its "interface".
const MsgNetworkUp = "network interface up"

// Attestation to the brokers.
const (
	MsgIdentity        = "appliance identity"
	MsgEnrollRequested = "enrollment requested"
	MsgAttested        = "attested"
	MsgLockdown        = "lockdown"
)

// MsgDiskRefused reports a disk that claims to be one of ours (the brokers
// released its key) but that is not used: its LUKS2 header is outside the
// policy. It is never unlocked or written.
const MsgDiskRefused = "disk refused"

// MsgStoreOpen reports the opened store.
const MsgStoreOpen = "store open"

// Serving, and its end after a lockdown or a failed re-attestation.
const (
	MsgServing = "ingest serving"
	// MsgStopped says what closing the volumes did: mappings closed,
	// mappings held open whose key was dropped in place, and mappings
	// whose key is still in the kernel (then also MsgKeysRemain).
	MsgStopped = "stopped serving"
	// MsgKeysRemain: after a stop, some volume key could not be taken out
	// of the kernel; the line names the mappings and why.
	MsgKeysRemain = "volume keys remain in the kernel"
	// MsgRestarting: after a stop, PID 1 replaces its own process image so
	// that every page that held a key is freed (and zeroed by the kernel).
	MsgRestarting = "restarting to clear memory"
	// MsgMemoryCleared: the restarted PID 1 overwrote the free memory.
	MsgMemoryCleared = "free memory cleared"
)

// The disk replacement workflow.
const (
	MsgDiskFailed  = "disk failed"
	MsgBlankDisk   = "blank disk waiting for approval"
	MsgResync      = "resync progress"
	MsgDiskHealthy = "replacement disk resynced; store healthy"
)

// Upgrade messages.
const (
	// MsgUpgradeStaged: a pushed image passed its checks, was written to
	// the trial slot and is the firmware's next boot ("version").
	MsgUpgradeStaged = "upgrade staged"
	// MsgUpgradeRefused: a pushed image was refused ("reason").
	MsgUpgradeRefused = "upgrade refused"
	// MsgUpgradeRebooting: serving stopped at a quiet moment; the
	// appliance reboots into the trial slot.
	MsgUpgradeRebooting = "rebooting into the upgrade"
	// MsgUpgradeCommitted: the running image, booted from the trial slot,
	// attested and was copied into slot A, the default boot.
	MsgUpgradeCommitted = "upgrade committed"
	// MsgTrialFailed: the trial image did not attest in time; the
	// appliance reboots and the firmware boots slot A, the old image.
	MsgTrialFailed = "trial image did not attest; rebooting into the committed image"
)

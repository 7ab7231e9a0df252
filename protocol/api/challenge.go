package api

// PathChallenge is the appliance's own endpoint (on its ingest listener)
// where an operator asks for a fresh quote.
const PathChallenge = "/_embassy/attest"

// ChallengeRequest carries the operator's nonce.
type ChallengeRequest struct {
	Nonce []byte `json:"nonce"`
}

// ChallengeResponse is the appliance's evidence for an operator: a quote
// whose extraData is ExtraData(nonce, SHA-256 of the TLS key serving the
// connection), its PCR values and the event log.
type ChallengeResponse struct {
	ApplianceID string         `json:"appliance_id"`
	Quote       []byte         `json:"quote"`
	Signature   []byte         `json:"signature"`
	PCRs        map[int][]byte `json:"pcrs"`
	EventLog    []byte         `json:"event_log"`
}

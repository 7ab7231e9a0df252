package attest

import (
	"errors"
	"fmt"
	"strings"

	"github.com/dataembassy/embassy/protocol/api"
)

// ErrBadCertificate: a broker's certificate for this appliance is not one
// a twin would count (see checkCertificate); that broker's answer is
// refused whole.
var ErrBadCertificate = errors.New("broker sent an unusable certificate")

// BrokerError is a broker's refusal: its HTTP status, its machine-readable
// code (callers branch on it, with errors.As or IsUnknownAppliance), its
// text for people, and whether it orders a lockdown.
type BrokerError struct {
	Broker   string
	Status   int
	Code     api.Code
	Message  string
	Lockdown bool
}

func (e *BrokerError) Error() string {
	return fmt.Sprintf("broker %s: %d %s", e.Broker, e.Status, e.Message)
}

// IsUnknownAppliance reports whether err holds a broker's refusal because
// it does not know this appliance (it must enroll first).
func IsUnknownAppliance(err error) bool {
	var be *BrokerError
	return errors.As(err, &be) && be.Code == api.CodeUnknownAppliance
}

// brokerErrors is the last failure of each broker that did not answer, on
// one line; errors.As and errors.Is see each of them.
type brokerErrors []error

func (e brokerErrors) Error() string {
	s := make([]string, len(e))
	for i, err := range e {
		s[i] = err.Error()
	}
	return strings.Join(s, "; ")
}

func (e brokerErrors) Unwrap() []error { return e }

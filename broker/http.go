package broker

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/protocol/identity"
)

// decode reads one JSON object of at most api.MaxBody bytes, rejecting
// unknown fields and trailing data.
func decode(w http.ResponseWriter, r *http.Request, v any) error {
	if r.Method != http.MethodPost {
		return reject(http.StatusMethodNotAllowed, ReasonBadRequest, "use POST")
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, api.MaxBody))
	if err != nil {
		return reject(http.StatusRequestEntityTooLarge, ReasonBadRequest, "body too large or unreadable")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return reject(http.StatusBadRequest, ReasonBadRequest, err.Error())
	}
	if dec.More() {
		return reject(http.StatusBadRequest, ReasonBadRequest, "trailing data")
	}
	return nil
}

// post answers a POST whose JSON body decodes into a Req with what fn
// returns, or with the refusal.
func post[Req any](fn func(*http.Request, *Req) (any, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req Req
		if err := decode(w, r, &req); err != nil {
			writeErr(w, err)
			return
		}
		resp, err := fn(r, &req)
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, http.StatusOK, resp)
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func writeErr(w http.ResponseWriter, err error) {
	var rj *Rejection
	if errors.As(err, &rj) {
		writeJSON(w, rj.Status, api.Error{Code: rj.Code(), Error: rj.Error(), Lockdown: rj.Lockdown})
		return
	}
	writeJSON(w, http.StatusInternalServerError, api.Error{Code: api.CodeInternal, Error: "internal error: " + err.Error()})
}

// ApplianceHandler serves the appliance API. Deposits must carry a client
// certificate issued by this broker's service CA (checked by the TLS layer
// with ApplianceTLSConfig and again here).
func (b *Broker) ApplianceHandler() http.Handler {
	mux := http.NewServeMux()
	handle := b.timedRoutes(mux)
	handle(api.PathEnroll, post(func(_ *http.Request, req *api.EnrollRequest) (any, error) {
		return b.Enroll(req)
	}))
	handle(api.PathActivate, post(func(_ *http.Request, req *api.ActivateRequest) (any, error) {
		return struct{}{}, b.Activate(req)
	}))
	handle(api.PathNonce, post(func(_ *http.Request, req *api.NonceRequest) (any, error) {
		return b.Nonce(req.ApplianceID)
	}))
	handle(api.PathAttest, post(func(_ *http.Request, req *api.AttestRequest) (any, error) {
		return b.Attest(req)
	}))
	handle(api.PathDeposit, func(w http.ResponseWriter, r *http.Request) {
		// The client's attested certificate is checked before the body is
		// read.
		id, err := b.attestedClient(r)
		if err != nil {
			writeErr(w, err)
			return
		}
		post(func(_ *http.Request, req *api.DepositRequest) (any, error) {
			return struct{}{}, b.Deposit(id, req)
		})(w, r)
	})
	return mux
}

// timedRoutes returns a function that adds a route to mux, timing its
// requests under the route's pattern.
func (b *Broker) timedRoutes(mux *http.ServeMux) func(route string, h http.HandlerFunc) {
	return func(route string, h http.HandlerFunc) { mux.Handle(route, b.metrics.timed(route, h)) }
}

// attestedClient returns the appliance id of a verified client certificate
// issued by this broker's service CA.
func (b *Broker) attestedClient(r *http.Request) (string, error) {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		return "", reject(http.StatusUnauthorized, ReasonNotAttested, "")
	}
	pool := x509.NewCertPool()
	pool.AddCert(b.cfg.ServiceCA.Cert)
	id, err := identity.Verify(r.TLS.PeerCertificates, pool, b.now(), x509.ExtKeyUsageClientAuth)
	if err != nil {
		return "", reject(http.StatusUnauthorized, ReasonNotAttested, err.Error())
	}
	return id, nil
}

// OperatorHandler serves the operator API and the broker's Prometheus
// metrics (api.PathMetrics). The TLS layer (OperatorTLSConfig) admits only
// clients with a certificate from the home-state operator CA.
func (b *Broker) OperatorHandler() http.Handler {
	mux := http.NewServeMux()
	handle := b.timedRoutes(mux)
	mux.Handle(api.PathMetrics, b.metrics.handler())
	handle(api.PathState, func(w http.ResponseWriter, r *http.Request) {
		st, err := b.State()
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, http.StatusOK, st)
	})
	handle(api.PathAudit, func(w http.ResponseWriter, r *http.Request) {
		ar, err := b.SignedAudit()
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, http.StatusOK, ar)
	})
	handle(api.PathManifests, post(func(r *http.Request, req *api.ApproveManifestRequest) (any, error) {
		m, err := b.ApproveManifest(operatorOf(r), req.Manifest, req.Signature)
		if err != nil {
			return nil, err
		}
		return api.ApprovedManifest{Version: m.Version, Kernel: m.Kernel.Version, Approved: time.Now().UTC()}, nil
	}))
	handle(api.PathEnrollments+"/", func(w http.ResponseWriter, r *http.Request) {
		id, action, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, api.PathEnrollments+"/"), "/")
		if action != "approve" || api.CheckApplianceID(id) != nil {
			writeErr(w, reject(http.StatusNotFound, ReasonBadRequest, "use /v1/enrollments/<appliance id>/approve"))
			return
		}
		var req struct{}
		if err := decode(w, r, &req); err != nil {
			writeErr(w, err)
			return
		}
		if err := b.ApproveEnrollment(operatorOf(r), id); err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, http.StatusOK, struct{}{})
	})
	handle(api.PathAppliances, func(w http.ResponseWriter, r *http.Request) {
		id, action, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, api.PathAppliances), "/")
		if api.CheckApplianceID(id) != nil {
			writeErr(w, reject(http.StatusNotFound, ReasonBadRequest, "bad appliance id"))
			return
		}
		by := operatorOf(r)
		var err error
		switch action {
		case "floor":
			var req api.FloorRequest
			if err = decode(w, r, &req); err == nil {
				err = b.SetFloor(by, id, req.Version)
			}
		case "disks":
			var req api.DiskApprovalRequest
			if err = decode(w, r, &req); err == nil {
				err = b.ApproveDisks(by, id, req.Count)
			}
		case "endpoints":
			var req api.EndpointsRequest
			if err = decode(w, r, &req); err == nil {
				err = b.SetEndpoints(by, id, req.Endpoints)
			}
		case "firmware":
			var req api.FirmwareApproval
			if err = decode(w, r, &req); err == nil {
				err = b.ApproveFirmware(by, id, req.Digest)
			}
		case "firmware-reject":
			var req api.FirmwareApproval
			if err = decode(w, r, &req); err == nil {
				err = b.RejectFirmware(by, id, req.Digest)
			}
		case "revoke":
			var req struct{}
			if err = decode(w, r, &req); err == nil {
				err = b.Revoke(by, id)
			}
		case "destroy-shares":
			var req struct{}
			if err = decode(w, r, &req); err == nil {
				var destroyed []string
				if destroyed, err = b.DestroyShares(by, id); err == nil {
					writeJSON(w, http.StatusOK, api.DestroySharesResponse{Destroyed: destroyed})
					return
				}
			}
		default:
			err = reject(http.StatusNotFound, ReasonBadRequest, "unknown action "+strconv.Quote(action))
		}
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, http.StatusOK, struct{}{})
	})
	return b.requireClientCert(mux)
}

// operatorOf names the operator behind a request that requireClientCert
// admitted: the leaf of its client certificate chain, which the TLS layer
// verified (OperatorTLSConfig or CustodianTLSConfig).
func operatorOf(r *http.Request) audit.Actor {
	return audit.OperatorActor(r.TLS.PeerCertificates[0])
}

// requireClientCert admits a request whose client certificate the TLS
// layer verified against the shared operator CAs (OperatorTLSConfig), or,
// on a broker with its own custodians (CustodianTLSConfig), one that
// verifies as a custodian of this broker.
func (b *Broker) requireClientCert(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.TLS != nil && len(r.TLS.VerifiedChains) > 0:
		case r.TLS != nil && len(r.TLS.PeerCertificates) > 0 && b.cfg.Custodians != nil:
			if err := b.admitCustodian(r.RemoteAddr, r.TLS.PeerCertificates); err != nil {
				writeErr(w, reject(http.StatusUnauthorized, ReasonNotCustodian, err.Error()))
				return
			}
		default:
			writeErr(w, reject(http.StatusUnauthorized, ReasonNoOperatorCert, ""))
			return
		}
		h.ServeHTTP(w, r)
	})
}

// OperatorTLSConfig requires operator client certificates from operatorCAs
// (one operator CA shared by brokers; a broker with its own custodians
// uses CustodianTLSConfig).
func OperatorTLSConfig(cert tls.Certificate, operatorCAs *x509.CertPool) *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert,
		ClientCAs: operatorCAs, MinVersion: tls.VersionTLS13}
}

// ApplianceTLSConfig authenticates the broker; a client certificate from
// this broker's service CA is verified when given (needed for deposits).
func (b *Broker) ApplianceTLSConfig(cert tls.Certificate) *tls.Config {
	pool := x509.NewCertPool()
	pool.AddCert(b.cfg.ServiceCA.Cert)
	return &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.VerifyClientCertIfGiven,
		ClientCAs: pool, MinVersion: tls.VersionTLS13}
}

// String describes the broker for logs.
func (b *Broker) String() string { return fmt.Sprintf("broker %s", b.cfg.Name) }

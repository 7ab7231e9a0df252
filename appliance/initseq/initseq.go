// Package initseq is the boot sequence run by embassy-init, PID 1 of the
// appliance. Every step is logged as structured JSON on the serial console.
// PID 1 never returns: on a fatal error it logs why and holds, serving
// nothing (fail closed).
package initseq

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	stdlog "log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/appliance/boot"
	"github.com/dataembassy/embassy/appliance/config"
	"github.com/dataembassy/embassy/appliance/ingest"
	"github.com/dataembassy/embassy/appliance/measuredboot"
	"github.com/dataembassy/embassy/appliance/netup"
	"github.com/dataembassy/embassy/appliance/replicate"
	"github.com/dataembassy/embassy/appliance/store"
	"github.com/dataembassy/embassy/appliance/volumes"
	"github.com/dataembassy/embassy/disks/discover"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"
	"github.com/dataembassy/embassy/tpm/eventlog"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Log messages the host side (tests, demo) looks for.
const (
	MsgStarting      = "embassy-init starting"
	MsgEvidence      = "measured boot evidence"
	MsgEventLogChunk = "event log chunk"
	MsgHalted        = "halted"
)

// ChunkSize is how many base64 characters of the event log go in one log line.
const ChunkSize = 3000

// Run executes the boot sequence and never returns.
func Run(log *slog.Logger) {
	start := time.Now()
	var info config.ImageInfoFile
	if b, err := os.ReadFile(config.ImageInfo); err == nil {
		_ = json.Unmarshal(b, &info)
	}
	log.Info(MsgStarting, "pid", os.Getpid(), "image_version", info.Version, "kernel_release", info.KernelRelease)

	if err := boot.MountPseudoFilesystems(log); err != nil {
		halt(log, "mount pseudo-filesystems", err)
	}
	log.Info("pseudo-filesystems mounted")

	names, err := boot.ReadModuleList(config.ModulesLoad)
	if err != nil {
		halt(log, "read module list", err)
	}
	if err := boot.LoadModules(log, names); err != nil {
		// Missing hardware drivers are not fatal; the disks and NICs that
		// matter are checked by the steps that use them.
		log.Warn("kernel modules", "err", err)
	}
	log.Info("kernel modules loaded", "count", len(names), "elapsed_ms", time.Since(start).Milliseconds())

	f, err := os.Open(config.Path)
	if err != nil {
		halt(log, "open image config", err)
	}
	cfg, err := config.Parse(f)
	f.Close()
	if err != nil {
		halt(log, "image config", err)
	}
	log.Info("image config", "brokers", len(cfg.Brokers), "threshold", cfg.Threshold)

	tpm, err := measuredboot.OpenTPM(10 * time.Second)
	if err != nil {
		halt(log, "open TPM", err)
	}
	ev, err := measuredboot.Collect(tpm)
	if err != nil {
		halt(log, "collect measured-boot evidence", err)
	}
	ReportEvidence(log, ev)

	ctx := context.Background()
	if _, err := netup.Up(ctx, log); err != nil {
		halt(log, "network", err)
	}
	pool, err := loadPool(config.BrokerCAPath)
	if err != nil {
		halt(log, "broker CA bundle", err)
	}
	att, err := attester.Open(tpm, attester.EKRSA)
	if err != nil {
		halt(log, "TPM keys", err)
	}
	tlsKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		halt(log, "TLS key", err)
	}
	ac, err := attest.New(cfg, pool, att, tlsKey, func() ([]byte, error) { return os.ReadFile(measuredboot.EventLogPath) }, log)
	if err != nil {
		halt(log, "broker client", err)
	}
	log.Info(MsgIdentity, "appliance_id", ac.ID())
	clientCAs, err := loadPool(config.ClientCAPath)
	if err != nil {
		halt(log, "client CA bundle", err)
	}
	for {
		serveUntilLockdown(ctx, log, ac, cfg, clientCAs, start)
	}
}

// serveUntilLockdown attests, opens the disks and the store, serves ingest
// and re-attests periodically. It returns after a lockdown order or a
// failed re-attestation, once serving has stopped, the volumes are closed
// and the keys dropped.
func serveUntilLockdown(ctx context.Context, log *slog.Logger, ac *attest.Client, cfg *config.Config, clientCAs *x509.CertPool, start time.Time) {
	results := attestLoop(ctx, log, ac, cfg)
	shares := 0
	for _, r := range results {
		shares += len(r.Shares)
	}
	log.Info(MsgAttested, "brokers", len(results), "image_version", results[0].ImageVersion,
		"shares", shares, "disk_approvals", results[0].DiskApprovals, "elapsed_ms", time.Since(start).Milliseconds())

	vm := &volumes.Manager{Log: log}
	old, fresh := openDisks(ctx, log, ac, cfg, results, vm)
	// Disks provisioned beside existing ones join as syncing and are
	// resynced once serving; on a first boot they all start empty.
	initial := old
	if len(old) == 0 {
		initial, fresh = fresh, nil
	}
	var specs []store.DiskSpec
	for _, v := range initial {
		specs = append(specs, store.DiskSpec{ID: v.UUID, Root: filepath.Join(v.MountPoint, "store")})
	}
	if len(specs) == 0 {
		log.Error("no data volume is open; nothing is served", "appliance_id", ac.ID())
		vm.CloseAll()
		time.Sleep(30 * time.Second)
		return
	}
	st, err := store.Open(log, specs)
	if err != nil {
		log.Error("open store", "err", err.Error())
		vm.CloseAll()
		return
	}
	status, degraded := st.Status()
	log.Info(MsgStoreOpen, "disks", len(status), "degraded", degraded)

	serveCtx, stopServing := context.WithCancel(ctx)
	var cert atomic.Pointer[tls.Certificate]
	cert.Store(results[0].Certificate)
	_, brokerRoots := ac.Config()
	rep := replicate.New(serveCtx, st, brokerRoots, cert.Load, log, replicate.Options{AntiEntropyEvery: 30 * time.Second})
	peers := attest.AgreedPeers(results, cfg.Threshold)
	rep.SetPeers(peers)
	st.SetFallback(func(ns, name string) ([]byte, error) {
		fctx, cancel := context.WithTimeout(serveCtx, 2*time.Minute)
		defer cancel()
		return rep.Fetch(fctx, ns, name)
	})
	repSrv := (&replicate.Server{Store: st, Roots: brokerRoots, Allowed: rep.IsPeer, Log: log}).Init()

	watcher := newDiskWatcher(log, ac, cfg, vm, st, results)
	ac.ReportHealth(func() *api.Health { return watcher.health(rep.Lag) })
	for _, v := range fresh {
		go watcher.addAndResync(serveCtx, v)
	}

	rules := ingest.Rules{}
	for repo, acc := range cfg.Ingest.Repositories {
		rules[repo] = ingest.RepoRule{Writers: acc.Writers, Readers: acc.Readers}
	}
	// Exact-path dispatch: http.ServeMux would clean "/repo/../x" into a
	// redirect, and the ingest server must see and refuse such paths.
	ing := &ingest.Server{Store: st, Auth: rules, ClientCAs: clientCAs, Log: log, OnStored: rep.Stored}
	own := map[string]http.HandlerFunc{}
	mux := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if h, ok := own[r.URL.Path]; ok {
			h(w, r)
			return
		}
		if strings.HasPrefix(r.URL.Path, replicate.Prefix) {
			repSrv.ServeHTTP(w, r)
			return
		}
		ing.ServeHTTP(w, r)
	})
	own[api.PathChallenge] = challengeHandler(ac, log)
	// Health and metrics carry no data and no secret: disk states, lag and
	// counters only.
	own[PathHealth] = func(w http.ResponseWriter, r *http.Request) {
		h := watcher.health(rep.Lag)
		w.Header().Set("Content-Type", "application/json")
		if h.Degraded {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		json.NewEncoder(w).Encode(map[string]any{"appliance_id": ac.ID(), "degraded": h.Degraded, "disks": h.Disks,
			"blank_disks": h.BlankDisks, "peers": h.Peers})
	}
	metrics := prometheus.NewRegistry()
	for _, cs := range [][]prometheus.Collector{st.Collectors(), ing.Collectors(), rep.Collectors(), repSrv.Collectors()} {
		metrics.MustRegister(cs...)
	}
	own[PathMetrics] = promhttp.HandlerFor(metrics, promhttp.HandlerOpts{}).ServeHTTP
	srv := &http.Server{
		Handler: mux,
		TLSConfig: &tls.Config{
			GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return cert.Load(), nil },
			ClientAuth:     tls.RequestClientCert, MinVersion: tls.VersionTLS12,
		},
		ReadHeaderTimeout: 30 * time.Second,
		ErrorLog:          stdlog.New(io.Discard, "", 0),
	}
	ln, err := net.Listen("tcp", fmt.Sprintf(":%d", cfg.Ingest.Port))
	if err != nil {
		log.Error("ingest listen", "err", err.Error())
		stopServing()
		vm.CloseAll()
		return
	}
	go srv.ServeTLS(ln, "", "")
	go watcher.run(serveCtx)
	go watcher.scrubLoop(serveCtx, 20*time.Second, 6*time.Hour)
	log.Info(MsgServing, "port", cfg.Ingest.Port, "peers", len(peers), "elapsed_ms", time.Since(start).Milliseconds())
	log.Info("boot sequence complete", "elapsed_ms", time.Since(start).Milliseconds())

	every := results[0].ReattestAfter
	if every <= 0 {
		every = 5 * time.Minute
	}
	for {
		time.Sleep(every)
		round, cancel := context.WithTimeout(ctx, time.Minute)
		res, err := ac.AttestAll(round, attest.Backoff{Initial: time.Second, Max: 5 * time.Second}, cfg.Threshold)
		cancel()
		if err != nil {
			var ld *attest.LockdownError
			if errors.As(err, &ld) {
				log.Error(MsgLockdown, "broker", ld.Broker, "reason", ld.Reason)
			} else {
				log.Error("re-attestation failed", "err", err.Error())
			}
			break
		}
		cert.Store(res[0].Certificate)
		watcher.latest.Store(&res)
		rep.SetPeers(attest.AgreedPeers(res, cfg.Threshold))
		log.Info("re-attested", "brokers", len(res), "image_version", res[0].ImageVersion)
	}
	srv.Close()
	stopServing()
	ac.ReportHealth(nil)
	if err := vm.CloseAll(); err != nil {
		log.Error("closing volumes", "err", err.Error())
	}
	log.Warn(MsgStopped, "reason", "lockdown or failed re-attestation; keys dropped, volumes closed")
}

// challengeHandler serves operators' remote attestation checks: anyone may
// ask (the evidence is not secret), one quote at a time.
func challengeHandler(ac *attest.Client, log *slog.Logger) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			http.Error(w, "use POST", http.StatusMethodNotAllowed)
			return
		}
		var req api.ChallengeRequest
		dec := json.NewDecoder(io.LimitReader(r.Body, 4096))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			http.Error(w, "bad request: "+err.Error(), http.StatusBadRequest)
			return
		}
		resp, err := ac.Challenge(req.Nonce)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		log.Info("remote attestation check answered")
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(resp)
	}
}

// Paths of the health and metrics endpoints on the ingest listener.
const (
	PathHealth  = "/_embassy/health"
	PathMetrics = "/_embassy/metrics"
)

// More log messages the host side looks for.
const (
	MsgServing = "ingest serving"
	MsgStopped = "stopped serving"
)

// MsgStoreOpen reports the opened store.
const MsgStoreOpen = "store open"

// openDisks unlocks our disks with the released secrets and provisions
// blank disks the operators approved. Foreign and boot disks are reported
// and left alone.
// It returns the volumes that were ours already and those provisioned now.
func openDisks(ctx context.Context, log *slog.Logger, ac *attest.Client, cfg *config.Config, results []*attest.Result, vm *volumes.Manager) (old, fresh []volumes.Volume) {
	disks, err := discover.List("/sys/block", "/dev")
	if err != nil {
		log.Error("disk discovery failed", "err", err.Error())
		return nil, nil
	}
	keys, cerr := attest.Combine(results, cfg.Threshold)
	if cerr != nil {
		log.Warn("some disk keys could not be recombined", "err", cerr.Error())
	}
	defer func() {
		for _, k := range keys {
			clear(k)
		}
	}()
	approved := approvals(results)
	var blank []discover.Disk
	for _, d := range disks {
		log.Info("disk", "name", d.Name, "kind", d.Kind, "size", d.Size, "serial", d.Serial, "detail", d.Detail)
		switch d.Kind {
		case discover.Ours:
			k, ok := keys[d.LUKSUUID]
			if !ok {
				log.Warn("disk stays locked: no key released for it", "disk", d.Name, "uuid", d.LUKSUUID)
				continue
			}
			if _, err := vm.Open(d, k); err != nil {
				log.Error("unlock failed", "disk", d.Name, "err", err.Error())
			}
		case discover.Blank:
			blank = append(blank, d)
		}
	}
	if len(blank) > 0 && approved == 0 {
		log.Info("blank disks wait for an operator's approval", "count", len(blank), "appliance_id", ac.ID())
	}
	old = vm.Volumes()
	if len(blank) > 0 && approved > 0 {
		// Depositing needs every broker's attested certificate.
		all, err := ac.AttestAll(ctx, attest.Backoff{Initial: time.Second, Max: 5 * time.Second}, len(cfg.Brokers))
		if err != nil {
			log.Warn("provisioning needs all brokers", "err", err.Error())
			return old, nil
		}
		for _, d := range blank[:min(len(blank), approved)] {
			if v, ok := provisionDisk(ctx, log, ac, all, d, vm); ok {
				fresh = append(fresh, v)
			}
		}
	}
	return old, fresh
}

func provisionDisk(ctx context.Context, log *slog.Logger, ac *attest.Client, all []*attest.Result, d discover.Disk, vm *volumes.Manager) (volumes.Volume, bool) {
	secret := make([]byte, 32)
	defer clear(secret)
	if _, err := rand.Read(secret); err != nil {
		log.Error("random", "err", err.Error())
		return volumes.Volume{}, false
	}
	log.Info("provisioning disk", "disk", d.Name, "serial", d.Serial)
	uuid, err := vm.Provision(ctx, d, secret)
	if err != nil {
		log.Error("provisioning failed", "disk", d.Name, "err", err.Error())
		return volumes.Volume{}, false
	}
	if err := ac.Deposit(ctx, all, uuid, secret); err != nil {
		// Without every share the disk could not be unlocked reliably later:
		// it is not used.
		log.Error("share deposit failed; disk not used", "disk", d.Name, "uuid", uuid, "err", err.Error())
		return volumes.Volume{}, false
	}
	log.Info("disk provisioned, shares deposited", "disk", d.Name, "serial", d.Serial, "uuid", uuid)
	nd, err := discover.Classify(d.Path)
	if err != nil || nd.Kind != discover.Ours {
		log.Error("provisioned disk does not classify as ours", "disk", d.Name)
		return volumes.Volume{}, false
	}
	nd.Name, nd.Serial = d.Name, d.Serial
	v, err := vm.Open(*nd, secret)
	if err != nil {
		log.Error("unlock of new disk failed", "disk", d.Name, "err", err.Error())
		return volumes.Volume{}, false
	}
	return v, true
}

// Log messages of the attestation step.
const (
	MsgIdentity        = "appliance identity"
	MsgEnrollRequested = "enrollment requested"
	MsgAttested        = "attested"
	MsgLockdown        = "lockdown"
)

// attestLoop attests to the brokers until k answer. An appliance the
// brokers do not know asks to enroll (credential activation) once and then
// waits for the operators' approval; a lockdown order is logged and the
// appliance keeps trying, serving nothing meanwhile.
func attestLoop(ctx context.Context, log *slog.Logger, ac *attest.Client, cfg *config.Config) []*attest.Result {
	enrollAsked := false
	for {
		round, cancel := context.WithTimeout(ctx, 30*time.Second)
		results, err := ac.AttestAll(round, attest.Backoff{Initial: time.Second, Max: 5 * time.Second}, cfg.Threshold)
		cancel()
		if err == nil {
			return results
		}
		var ld *attest.LockdownError
		switch {
		case errors.As(err, &ld):
			log.Error(MsgLockdown, "broker", ld.Broker, "reason", ld.Reason)
		case !enrollAsked && attest.IsUnknownAppliance(err):
			if eerr := ac.Enroll(ctx); eerr != nil {
				log.Warn("enrollment request incomplete", "err", eerr.Error())
			} else {
				enrollAsked = true
				log.Info(MsgEnrollRequested, "appliance_id", ac.ID())
			}
		default:
			log.Warn("attestation below threshold; retrying", "err", err.Error())
		}
		time.Sleep(2 * time.Second)
	}
}

func loadPool(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	certs, err := config.ParseCertBundle(b)
	if err != nil {
		return nil, err
	}
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p, nil
}

// ReportEvidence logs the PCR values, a readable list of the PCR4 and PCR9
// events, and the raw event log in base64 chunks with its SHA-256, so the
// host can replay it.
func ReportEvidence(log *slog.Logger, ev *measuredboot.Evidence) {
	pcrs := map[string]string{}
	for i, v := range ev.PCRs {
		pcrs[fmt.Sprint(i)] = hex.EncodeToString(v)
	}
	var boot []eventlog.Event
	if evs, err := eventlog.Unverified(ev.EventLog); err == nil {
		for _, e := range evs {
			if e.PCR == 4 || e.PCR == 9 {
				boot = append(boot, e)
			}
		}
	} else {
		log.Warn("event log unreadable", "err", err)
	}
	sum := sha256.Sum256(ev.EventLog)
	enc := base64.StdEncoding.EncodeToString(ev.EventLog)
	chunks := (len(enc) + ChunkSize - 1) / ChunkSize
	log.Info(MsgEvidence, "pcrs", pcrs, "boot_events", boot,
		"event_log_bytes", len(ev.EventLog), "event_log_sha256", hex.EncodeToString(sum[:]), "chunks", chunks)
	for i := 0; i < chunks; i++ {
		end := min((i+1)*ChunkSize, len(enc))
		log.Info(MsgEventLogChunk, "seq", i, "data", enc[i*ChunkSize:end])
	}
}

func halt(log *slog.Logger, step string, err error) {
	log.Error(MsgHalted, "step", step, "err", err.Error())
	hold()
}

// hold keeps PID 1 alive forever: if init exits, the kernel panics.
func hold() {
	for {
		time.Sleep(time.Hour)
	}
}

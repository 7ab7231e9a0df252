// Package initseq is the boot sequence run by embassy-init, PID 1 of the
// appliance, in the numbered phases of docs/appliance.md: this file runs
// them in order, disks.go opens and provisions the data disks (phase 5),
// package node serves (phases 6 and 7) and package diskwatch keeps the
// store in step with the hardware meanwhile. Every step is logged as
// structured JSON on the serial console (messages in package logmsg).
// PID 1 never returns: on a fatal error it logs why and holds, serving
// nothing (fail closed).
package initseq

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/appliance/boot"
	"github.com/dataembassy/embassy/appliance/config"
	"github.com/dataembassy/embassy/appliance/diskwatch"
	"github.com/dataembassy/embassy/appliance/ingest"
	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/appliance/measuredboot"
	"github.com/dataembassy/embassy/appliance/memclear"
	"github.com/dataembassy/embassy/appliance/netup"
	"github.com/dataembassy/embassy/appliance/node"
	"github.com/dataembassy/embassy/appliance/objectio"
	"github.com/dataembassy/embassy/appliance/replicate"
	"github.com/dataembassy/embassy/appliance/store"
	"github.com/dataembassy/embassy/appliance/volumes"
	"github.com/dataembassy/embassy/images/imagekey"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/tpm/attester"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// heapLimit is the Go heap's soft limit: the upload budget and room for
// everything else PID 1 holds (TLS, queues, listings).
const heapLimit = objectio.DefaultBudget + 192<<20

// Run executes the boot sequence and never returns.
func Run(log *slog.Logger) {
	start := time.Now()
	var info config.ImageInfoFile
	if b, err := os.ReadFile(config.ImageInfo); err == nil {
		_ = json.Unmarshal(b, &info)
	}
	log.Info(logmsg.MsgStarting, "pid", os.Getpid(), "image_version", info.Version, "kernel_release", info.KernelRelease)

	// 1. Pseudo-filesystems and kernel modules.
	if err := boot.MountPseudoFilesystems(log); err != nil {
		halt(log, "mount pseudo-filesystems", err)
	}
	log.Info("pseudo-filesystems mounted")
	if os.Getenv(restartedEnv) == "1" {
		// The process image before this one held keys: overwrite the
		// memory it freed before anything else runs.
		n, err := memclear.Free("/proc/meminfo", "/proc/sys/vm/drop_caches")
		if err != nil {
			log.Error("clearing free memory", "err", err.Error())
		}
		log.Info(logmsg.MsgMemoryCleared, "bytes", n)
	}
	// A soft limit for the Go heap: uploads in memory are bounded by the
	// upload budget, but freed upload buffers would otherwise pile up to
	// twice the live heap before the collector runs. PID 1 killed by the
	// OOM killer is a dead appliance.
	debug.SetMemoryLimit(heapLimit)

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

	// 2. The image config and the measured-boot evidence.
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
	// The boot disk and its slots: which image this boot runs, and
	// whether it came from the trial slot (an upgrade's first boot).
	var slots *trialBoot
	if booted, err := bootedUKI(ev.EventLog, ev.PCRs); err != nil {
		log.Warn("running image unknown; in-place upgrades unavailable", "err", err.Error())
	} else if slots, err = findBootDisk(booted); err != nil {
		log.Warn("boot disk not found; in-place upgrades unavailable", "err", err.Error())
	} else {
		log.Info("boot slot", "disk", slots.disk.Path, "trial", slots.trial.Load())
	}
	imagePub, err := imagekey.LoadPublic(config.ImagePubKey)
	if err != nil {
		log.Warn("image-signing key missing; in-place upgrades unavailable", "err", err.Error())
	}

	// 3. The network, and the broker client with its TPM keys.
	ctx := context.Background()
	if _, err := netup.Up(ctx, log); err != nil {
		halt(log, "network", err)
	}
	brokerCAs := map[string]*x509.CertPool{}
	for _, b := range cfg.Brokers {
		if brokerCAs[b.Name], err = loadPool(config.BrokerCAPath(b.Name)); err != nil {
			halt(log, "broker "+b.Name+" CA", err)
		}
	}
	att, err := attester.Open(tpm, attester.EKRSA)
	if err != nil {
		halt(log, "TPM keys", err)
	}
	tlsKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		halt(log, "TLS key", err)
	}
	ac, err := attest.New(cfg, brokerCAs, att, tlsKey, func() ([]byte, error) { return os.ReadFile(measuredboot.EventLogPath) }, log)
	if err != nil {
		halt(log, "broker client", err)
	}
	log.Info(logmsg.MsgIdentity, "appliance_id", ac.ID())
	clientCAs, err := loadPool(config.ClientCAPath)
	if err != nil {
		halt(log, "client CA bundle", err)
	}
	up := &upgrades{slots: slots, pub: imagePub, running: info.Version, trialTimeout: cfg.TrialTimeout()}
	for {
		serveUntilLockdown(ctx, log, ac, cfg, clientCAs, start, up)
		restart(log) // returns only if exec failed
	}
}

// restartedEnv marks a PID 1 that replaced its predecessor after a stop.
const restartedEnv = "EMBASSY_RESTARTED"

// restart replaces PID 1's process image with a fresh embassy-init after a
// stop. Go cannot promise that every copy of a secret it handled is wiped:
// luks.go's buffers, the device-mapper table it formats, freed heap that
// the runtime keeps. Exec frees the whole address space at once, and the
// new process overwrites all free memory first (appliance/memclear), so no
// share, passphrase or volume key outlives a lockdown in memory. It then
// starts over: mounts, modules and leases are already in place and are
// taken as they are; it attests again before anything is served. If exec
// fails, restart logs why and returns, and this process starts over.
func restart(log *slog.Logger) {
	exe, err := os.Executable()
	if err == nil {
		log.Warn(logmsg.MsgRestarting, "exe", exe)
		env := slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, restartedEnv+"=") })
		err = syscall.Exec(exe, os.Args, append(env, restartedEnv+"=1"))
	}
	log.Error("restart failed; starting over in this process", "err", err.Error())
}

// serveUntilLockdown attests, opens the disks and the store, serves ingest
// and re-attests periodically (phases 4 to 7). It returns after a lockdown
// order or a failed re-attestation, once serving has stopped, the volumes
// are closed and the keys dropped.
func serveUntilLockdown(ctx context.Context, log *slog.Logger, ac *attest.Client, cfg *config.Config, clientCAs *x509.CertPool, start time.Time, up *upgrades) {
	// 4. Attestation: k brokers answer; the others' answers come in late
	// (a lockdown among them stops serving in phase 7). A trial image
	// that cannot attest in time reboots into the committed one.
	// The disks in our format go with every attestation: a broker audits
	// why any of them gets no key (a disk moved in from another server).
	reportDisks(log, ac)
	results, late := attestLoop(ctx, log, ac, cfg, up.trialDeadline(start))
	shares := 0
	for _, r := range results {
		shares += len(r.Shares)
	}
	log.Info(logmsg.MsgAttested, "brokers", len(results), "image_version", results[0].ImageVersion,
		"shares", shares, "disk_approvals", results[0].DiskApprovals, "elapsed_ms", time.Since(start).Milliseconds())

	// 5. Disks: unlock ours, provision approved blank ones.
	vm := &volumes.Manager{Log: log}
	dk := &disks{log: log, ac: ac, cfg: cfg, vm: vm}
	old, fresh := dk.open(ctx, results)
	// The keys are recombined and the disks open: no share is kept.
	attest.Round(results).WipeShares()
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
	var refused []volumes.Volume
	for _, d := range dk.refused {
		specs = append(specs, store.DiskSpec{ID: d.LUKSUUID, Unavailable: "refused: " + d.Detail})
		refused = append(refused, volumes.Volume{Disk: d.Name, UUID: d.LUKSUUID, Serial: d.Serial})
	}
	if len(initial) == 0 {
		log.Error("no data volume is open; nothing is served", "appliance_id", ac.ID())
		vm.CloseAll()
		time.Sleep(30 * time.Second)
		return
	}

	// 6. The mirrored store, replication, the disk watcher, and serving.
	st, err := store.Open(log, specs)
	if err != nil {
		log.Error("open store", "err", err.Error())
		vm.CloseAll()
		return
	}
	quotas := map[string]int64{}
	for repo, acc := range cfg.Ingest.Repositories {
		quotas[repo] = acc.QuotaBytes
	}
	if err := st.SetQuotas(quotas); err != nil {
		log.Error("repository quotas", "err", err.Error())
		vm.CloseAll()
		return
	}
	status, degraded := st.Status()
	log.Info(logmsg.MsgStoreOpen, "disks", len(status), "degraded", degraded)

	serveCtx, stopServing := context.WithCancel(ctx)
	var cert atomic.Pointer[tls.Certificate]
	cert.Store(results.Certificate())
	rep := replicate.New(serveCtx, st, ac.Verifier(), cert.Load, log, replicate.Options{AntiEntropyEvery: 30 * time.Second})
	peers := attest.Round(results).Peers(cfg.Threshold)
	rep.SetPeers(peers)
	st.SetFallback(func(ns, name string) ([]byte, error) {
		fctx, cancel := context.WithTimeout(serveCtx, 2*time.Minute)
		defer cancel()
		return rep.Fetch(fctx, ns, name)
	})
	// One bound on the upload bytes in memory for both servers: PID 1
	// killed by the OOM killer would be a dead appliance.
	uploads := objectio.NewBudget(objectio.DefaultBudget)
	repSrv := (&replicate.Server{Store: st, IDs: ac.Verifier(), Allowed: rep.IsPeer, Log: log, Budget: uploads}).Init()

	watcher := diskwatch.New(diskwatch.Config{Log: log, SysBlock: sysBlock, DevDir: devDir, ApplianceID: ac.ID(),
		Store: st, Volumes: vm, Refused: refused, Provision: dk.provisionApproved, Peers: rep.Lag,
		Approvals: attest.Round(results).DiskApprovals()})
	upg := up.newUpgrader(log, ac, cfg.Threshold)
	ac.ReportHealth(func() *api.Health {
		h := watcher.Health()
		if h != nil && upg != nil {
			h.Upgrade = upg.Health()
		}
		return h
	})
	for _, v := range fresh {
		go watcher.AddAndResync(serveCtx, v)
	}

	rules := ingest.Rules{}
	for repo, acc := range cfg.Ingest.Repositories {
		rules[repo] = ingest.RepoRule{Writers: acc.Writers, Readers: acc.Readers}
	}
	ing := &ingest.Server{Store: st, Auth: rules, ClientCAs: clientCAs, Log: log, OnStored: rep.Stored, Budget: uploads}
	reg := prometheus.NewRegistry()
	for _, cs := range [][]prometheus.Collector{st.Collectors(), ing.Collectors(), rep.Collectors(), repSrv.Collectors(), uploads.Collectors()} {
		reg.MustRegister(cs...)
	}
	metrics := promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
	var upgradeHandler http.Handler
	if upg != nil {
		upgradeHandler = upg
	}
	n := node.New(node.Deps{Log: log, Attester: ac, Health: watcher, Ingest: ing, Replication: repSrv, Metrics: metrics, Upgrade: upgradeHandler,
		Cert: &cert, Port: cfg.Ingest.Port, Threshold: cfg.Threshold, ReattestEvery: results.ReattestAfter(attest.DefaultReattestBounds()), Late: late,
		Monitor: func(r *http.Request) error { _, err := ing.ClientName(r); return err },
		Reattested: func(r attest.Round) {
			// Brokers release the shares with every answer; serving needs
			// none of them.
			r.WipeShares()
			watcher.SetApprovals(r.DiskApprovals())
			rep.SetPeers(r.Peers(cfg.Threshold))
			up.commit(log) // a commit that failed before
		}})
	if err := n.Listen(); err != nil {
		log.Error("ingest listen", "err", err.Error())
		stopServing()
		vm.CloseAll()
		return
	}
	// A trial image that attested, opened its disks and serves becomes
	// the default boot.
	up.commit(log)
	go watcher.Run(serveCtx, 3*time.Second)
	go watcher.ScrubLoop(serveCtx, 20*time.Second, 6*time.Hour)
	log.Info(logmsg.MsgServing, "port", cfg.Ingest.Port, "peers", len(peers), "elapsed_ms", time.Since(start).Milliseconds())
	log.Info("boot sequence complete", "elapsed_ms", time.Since(start).Milliseconds())

	// 7. Re-attest until a lockdown or a failed re-attestation; then stop
	// serving, close the volumes (the kernel drops the keys), start over.
	runCtx, stopRun := context.WithCancel(ctx)
	defer stopRun()
	var rebooting atomic.Bool
	if upg != nil {
		go func() {
			select {
			case <-upg.Ready():
			case <-runCtx.Done():
				return
			}
			// A quiet moment: what the twin lacks is sent first (bounded).
			waitReplicated(runCtx, log, rep, 2*time.Minute)
			rebooting.Store(true)
			stopRun()
		}()
	}
	stop := n.Run(runCtx)
	stopServing()
	ac.ReportHealth(nil)
	closed, err := vm.CloseAll()
	if !closed.AllKeysGone() {
		log.Error(logmsg.MsgKeysRemain, "mappings", closed.KeyRemains, "err", err.Error())
	} else if err != nil {
		log.Warn("closing volumes", "err", err.Error())
	}
	log.Warn(logmsg.MsgStopped, "stopped_by", string(stop.Reason), "all_keys_gone", closed.AllKeysGone(),
		"closed", closed.Closed, "key_dropped", closed.KeyDropped, "key_remains", closed.KeyRemains)
	if rebooting.Load() && stop.Reason == node.ReasonDone {
		log.Warn(logmsg.MsgUpgradeRebooting)
		rebootNow(log)
	}
}

// attestLoop attests to the brokers until k answer, and returns their
// answers and the late ones still to come from the other brokers (until
// the round's deadline). An appliance the brokers do not know asks to
// enroll (credential activation) once and then waits for the operators'
// approval; a lockdown order is logged and the appliance keeps trying,
// serving nothing meanwhile.
func attestLoop(ctx context.Context, log *slog.Logger, ac *attest.Client, cfg *config.Config, trialDeadline time.Time) (attest.Round, *attest.Late) {
	enrollAsked := false
	// Between failed rounds: 2 s, doubling to 10 s while they keep
	// failing (a round refused at every broker ends at once, so the pause
	// is what paces the requests and the brokers' audit entries).
	pause := 2 * time.Second
	for {
		if !trialDeadline.IsZero() && time.Now().After(trialDeadline) {
			log.Error(logmsg.MsgTrialFailed)
			rebootNow(log)
		}
		round, cancel := context.WithTimeout(ctx, 30*time.Second)
		results, late, err := ac.AttestFirst(round, attest.Backoff{Initial: time.Second, Max: 5 * time.Second}, cfg.Threshold)
		if err == nil {
			// The round goes on for the other brokers' answers.
			go func() {
				<-late.Done()
				cancel()
			}()
			return results, late
		}
		cancel()
		var ld *attest.LockdownError
		switch {
		case errors.As(err, &ld):
			log.Error(logmsg.MsgLockdown, "broker", ld.Broker, "reason", ld.Reason)
		case !enrollAsked && attest.IsUnknownAppliance(err):
			if eerr := ac.Enroll(ctx); eerr != nil {
				log.Warn("enrollment request incomplete", "err", eerr.Error())
			} else {
				enrollAsked = true
				log.Info(logmsg.MsgEnrollRequested, "appliance_id", ac.ID())
			}
		default:
			log.Warn("attestation below threshold; retrying", "err", err.Error(), "retry_in", pause.String())
		}
		time.Sleep(pause)
		pause = min(2*pause, 10*time.Second)
	}
}

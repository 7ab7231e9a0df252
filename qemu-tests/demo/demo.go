// Package demo runs the local-default demonstration end to end with the
// real programs: three keybroker processes (k=2), one appliance VM with
// fresh disks and TPM, the operator's embassyctl (enroll, approve the image
// and the disks), a restic backup of a sample register over mutual TLS, and
// a readable status. Everything it starts is stopped when ctx ends.
package demo

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/images/devpki"
	"github.com/dataembassy/embassy/images/imagekey"
	"github.com/dataembassy/embassy/internal/cli"
	"github.com/dataembassy/embassy/operator/opclient"
	"github.com/dataembassy/embassy/qemu-tests/bootreport"
	"github.com/dataembassy/embassy/qemu-tests/vm"
	"github.com/dataembassy/embassy/tpm/pcrs"
)

// Options says where things are.
type Options struct {
	Image  string // image folder
	Cache  string // cache folder (PKI, dev keys, swtpm CA)
	Bin    string // folder with keybroker and embassyctl
	Sample string // folder to back up
	Out    io.Writer
	// Hold keeps everything running until ctx ends.
	Hold bool
}

type run struct {
	o     Options
	work  string
	procs []*exec.Cmd
}

func (r *run) say(format string, args ...any) { fmt.Fprintf(r.o.Out, format+"\n", args...) }

// Run performs the demonstration.
func Run(ctx context.Context, o Options) error {
	if err := o.check(); err != nil {
		return err
	}
	work, err := os.MkdirTemp("", "embassy-demo-")
	if err != nil {
		return err
	}
	r := &run{o: o, work: work}
	defer os.RemoveAll(work)
	defer r.stopAll()
	return r.run(ctx)
}

// check says which command provides a missing input.
func (o Options) check() error {
	if err := cli.RequireImageDir(o.Image); err != nil {
		return err
	}
	for _, b := range []string{"keybroker", "embassyctl"} {
		if _, err := os.Stat(filepath.Join(o.Bin, b)); err != nil {
			return cli.Next(fmt.Errorf("no %s binary: %w", b, err), "run `make bin` (it builds them into %s), or pass -bin DIR", o.Bin)
		}
	}
	return nil
}

func (r *run) start(name string, args ...string) error {
	cmd := exec.Command(filepath.Join(r.o.Bin, name), args...)
	logf, err := os.Create(filepath.Join(r.work, fmt.Sprintf("%s-%d.log", name, len(r.procs))))
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	r.procs = append(r.procs, cmd)
	return nil
}

func (r *run) stopAll() {
	for _, p := range r.procs {
		p.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { p.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			p.Process.Kill()
			<-done
		}
	}
	r.procs = nil
}

func (r *run) ctl(args ...string) (string, error) {
	// Each broker's entry in operator.json names its CA and the custodian
	// credential for it.
	full := append([]string{"--brokers", filepath.Join(r.work, "operator.json")}, args...)
	out, err := exec.Command(filepath.Join(r.o.Bin, "embassyctl"), full...).CombinedOutput()
	return string(out), err
}

func (r *run) run(ctx context.Context) error {
	pkiDir := filepath.Join(r.o.Cache, "pki")
	clientCA := devpki.CA{CertPath: filepath.Join(pkiDir, "client-ca.pem"), KeyPath: filepath.Join(pkiDir, "client-ca.key")}
	clientCert, clientKey, err := devpki.EnsureLeaf(pkiDir, "population-registry", "population-registry", clientCA)
	if err != nil {
		return err
	}

	// 1. The swtpm manufacturer CA the brokers trust for EK certificates
	// comes into being with the first swtpm_setup: boot the appliance first.
	diskA, diskB := filepath.Join(r.work, "disk-a.img"), filepath.Join(r.work, "disk-b.img")
	for _, d := range []string{diskA, diskB} {
		f, err := os.Create(d)
		if err != nil {
			return err
		}
		f.Truncate(1 << 30)
		f.Close()
	}
	pub := filepath.Join(r.o.Cache, "keys", "image-signing-dev.key.pub")
	pubKey, err := imagekey.LoadPublic(pub)
	if err != nil {
		return err
	}
	m, err := bootreport.ImageManifest(r.o.Image, pubKey)
	if err != nil {
		return fmt.Errorf("image manifest: %w", err)
	}
	swtpmCA := filepath.Join(r.o.Cache, "swtpm-localca")
	if err := os.MkdirAll(filepath.Join(r.work, "appliance", "tpm"), 0o700); err != nil {
		return err
	}
	if err := vm.SetupTPM(ctx, filepath.Join(r.work, "appliance", "tpm"), swtpmCA); err != nil {
		return err
	}
	var manu bytes.Buffer
	pems, _ := filepath.Glob(filepath.Join(swtpmCA, "*.pem"))
	for _, p := range pems {
		manu.Write(mustRead(p))
	}
	manuFile := filepath.Join(r.work, "manufacturer-ca.pem")
	os.WriteFile(manuFile, manu.Bytes(), 0o644)

	// 2. Three brokers, k=2.
	r.say("starting 3 key brokers (k=2) on 127.0.0.1:7441-7443, operator API on 8441-8443, each with its own custodian")
	var ops []opclient.Broker
	// restic's clients check the appliance's certificate the standard way:
	// against a bundle of the brokers' roots.
	var rootBundle []byte
	for i := 0; i < 3; i++ {
		name := fmt.Sprintf("broker-%c", 'a'+i)
		dir := filepath.Join(r.work, name)
		// Each broker has its own root CA; the image was built with these
		// (mkimage's local default), one pinned per broker.
		brokerCA, err := devpki.BrokerCA(pkiDir, name)
		if err != nil {
			return err
		}
		rootBundle = append(rootBundle, mustRead(brokerCA.CertPath)...)
		// init makes the broker's own custodian CA and its first custodian;
		// the demo's embassyctl holds all three custodians' credentials.
		custodian := "custodian-" + name[len("broker-"):]
		out, err := exec.Command(filepath.Join(r.o.Bin, "keybroker"), "init", "--dir", dir, "--name", name,
			"--broker-ca-cert", brokerCA.CertPath, "--broker-ca-key", brokerCA.KeyPath, "--hosts", "127.0.0.1,10.0.2.2,10.0.3.2",
			"--custodian", custodian).CombinedOutput()
		if err != nil {
			return fmt.Errorf("keybroker init: %v: %s", err, out)
		}
		if err := r.start("keybroker", "serve", "--dir", dir, "--name", name,
			"--manufacturer-ca", manuFile, "--image-pubkey", pub, "--reattest", "1m",
			"--appliance-listen", fmt.Sprintf("127.0.0.1:%d", 7441+i), "--operator-listen", fmt.Sprintf("127.0.0.1:%d", 8441+i)); err != nil {
			return err
		}
		// The operators pin the audit key init wrote (audit verify checks
		// the brokers' signed heads with it).
		auditPub, err := audit.ParsePublicKey(mustRead(filepath.Join(dir, audit.SigningPubKeyFile)))
		if err != nil {
			return fmt.Errorf("audit key of %s: %w", name, err)
		}
		// The list's relative paths would be read from its own folder.
		ca, _ := filepath.Abs(brokerCA.CertPath)
		absDir, _ := filepath.Abs(dir)
		ops = append(ops, opclient.Broker{Name: name, URL: fmt.Sprintf("https://127.0.0.1:%d", 8441+i), CA: ca,
			Cert: filepath.Join(absDir, "custodians", custodian+".pem"), Key: filepath.Join(absDir, "custodians", custodian+".key"), AuditKey: auditPub})
	}
	b, _ := json.Marshal(ops)
	os.WriteFile(filepath.Join(r.work, "operator.json"), b, 0o644)
	rootsFile := filepath.Join(r.work, "broker-roots.pem")
	os.WriteFile(rootsFile, rootBundle, 0o644)

	// 3. The appliance.
	port, err := vm.FreePort()
	if err != nil {
		return err
	}
	cfg := bootreport.BootConfig("demo", r.o.Image)
	cfg.StateDir = filepath.Join(r.work, "appliance")
	cfg.LogDir = filepath.Join(r.o.Image, "demo-logs")
	cfg.SwtpmCA = swtpmCA
	cfg.Disks = []string{diskA, diskB}
	cfg.Forwards = []vm.Forward{{NIC: 0, HostPort: port, GuestPort: 8443}}
	start := time.Now()
	cfg.Stdout = &narrator{out: r.o.Out, start: start}
	r.say("booting appliance image v%d with two fresh 1 GiB disks (console: %s)", m.Version, filepath.Join(cfg.LogDir, "demo.serial.log"))
	v, err := vm.Start(ctx, cfg)
	if err != nil {
		return err
	}
	defer v.Close()
	ev, err := bootreport.Wait(ctx, v)
	if err != nil {
		return err
	}
	verdict, err := bootreport.Verify(ev, m.Measurements)
	if err != nil {
		return fmt.Errorf("event log does not replay to the TPM's PCRs: %w", err)
	}
	r.say("\nmeasured-boot verdict (event log replayed against the %s read from the TPM): signed UKI %v, Secure Boot keys %v, cmdline %v, initrd %v, UKI sections %v",
		pcrs.Description, mark(verdict.Check.UKIMatch), mark(verdict.Check.SecureBootMatch), mark(verdict.Check.LoadOptionsMatch),
		mark(verdict.Check.InitrdMatch), mark(verdict.Check.SectionsMatch))
	if !verdict.Check.OK() {
		return fmt.Errorf("the booted image does not match manifest v%d: %v", m.Version, verdict.Check.Problems)
	}
	id, err := waitField(ctx, v, logmsg.MsgIdentity, "appliance_id")
	if err != nil {
		return err
	}
	if _, err := waitField(ctx, v, logmsg.MsgEnrollRequested, "appliance_id"); err != nil {
		return err
	}

	// 4. The operators at home: enroll, approve the image and two disks.
	r.say("\noperator: enrolling %s, approving image v%d and 2 disks", id, m.Version)
	for _, args := range [][]string{{"enroll", id}, {"approve-image", r.o.Image}, {"approve-disk", "--count", "2", id}} {
		out, err := r.ctl(args...)
		r.say("$ embassyctl %s\n%s", strings.Join(args, " "), strings.TrimRight(out, "\n"))
		if err != nil {
			return fmt.Errorf("embassyctl %s: %w", args[0], err)
		}
	}
	if _, err := waitField(ctx, v, logmsg.MsgServing, "port"); err != nil {
		return err
	}

	// 5. A backup of a sample register.
	pemFile := filepath.Join(r.work, "population-registry.pem")
	os.WriteFile(pemFile, append(mustRead(clientCert), mustRead(clientKey)...), 0o600)
	restic := func(args ...string) (string, error) {
		full := append([]string{"-r", fmt.Sprintf("rest:https://127.0.0.1:%d/population/", port), "--cacert", rootsFile,
			"--tls-client-cert", pemFile, "--no-cache"}, args...)
		cmd := exec.CommandContext(ctx, "restic", full...)
		cmd.Env = append(os.Environ(), "RESTIC_PASSWORD=population register (demo)")
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	r.say("\nhome state: restic backup of %s into the embassy", r.o.Sample)
	for _, args := range [][]string{{"init"}, {"backup", r.o.Sample}, {"snapshots"}} {
		out, err := restic(args...)
		r.say("$ restic %s\n%s", args[0], lastLines(out, 6))
		if err != nil {
			return fmt.Errorf("restic %s: %w", args[0], err)
		}
	}

	// 6. Status.
	r.say("\nstatus:")
	for _, args := range [][]string{{"attest", fmt.Sprintf("127.0.0.1:%d", port)}, {"status"}, {"audit", "verify"}} {
		out, err := r.ctl(args...)
		r.say("$ embassyctl %s\n%s", strings.Join(args, " "), strings.TrimRight(out, "\n"))
		if err != nil {
			return err
		}
	}
	for _, l := range v.Lines() {
		switch bootreport.JSONMsg(l.Text) {
		case "disk", logmsg.MsgStoreOpen, "volume unlocked and mounted":
			r.say("appliance: %s", summary(l.Text))
		}
	}
	r.say("\nthe embassy is serving on https://127.0.0.1:%d (restic repository rest:https://127.0.0.1:%d/population/)", port, port)
	if r.o.Hold {
		r.say("everything keeps running until Ctrl-C")
		<-ctx.Done()
	}
	r.say("stopping the appliance and the brokers")
	return nil
}

func waitField(ctx context.Context, v *vm.VM, msg, field string) (string, error) {
	_, line, err := v.WaitFor(ctx, 0, func(s string) bool {
		m := bootreport.JSONMsg(s)
		return m == msg || m == logmsg.MsgHalted
	})
	if err != nil {
		return "", fmt.Errorf("waiting for %q: %w", msg, err)
	}
	var f map[string]any
	json.Unmarshal([]byte(line.Text), &f)
	if f["msg"] == logmsg.MsgHalted {
		return "", fmt.Errorf("appliance halted: %s", line.Text)
	}
	return fmt.Sprint(f[field]), nil
}

func mustRead(p string) []byte {
	b, _ := os.ReadFile(p)
	return b
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "  " + strings.Join(lines, "\n  ")
}

func mark(ok bool) string {
	if ok {
		return "match"
	}
	return "MISMATCH"
}

// Package vm boots an appliance image the way firmware boots a server: QEMU
// under TCG with the q35 machine, OVMF as pflash (read-only CODE, per-VM
// VARS copy) booting the image's disk, one swtpm per VM with an EK certificate from a local CA, two
// virtio NICs on user networking, raw virtio disks, the serial console
// captured to a log file, and a QMP handle for fault injection. Teardown
// kills exactly the processes it started, by PID, and removes its temp dir.
package vm

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Default firmware images from Debian's ovmf package.
const (
	DefaultOVMFCode = "/usr/share/OVMF/OVMF_CODE_4M.fd"
	DefaultOVMFVars = "/usr/share/OVMF/OVMF_VARS_4M.fd"
	// SecureBootOVMFCode is OVMF built with Secure Boot and SMM.
	SecureBootOVMFCode = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
)

// BootDiskSerial is the serial number of the boot disk (Config.BootDisk).
const BootDiskSerial = "EMBASSYBOOT"

// Forward maps a host TCP port on 127.0.0.1 to a guest port through a NIC.
type Forward struct {
	NIC       int
	HostPort  int
	GuestPort int
}

// GuestForward sends the guest's TCP connections to one address on a NIC's
// network (GuestAddr, ip:port) to a command QEMU starts for each
// connection, with the connection as its standard input, output and error
// (QEMU's guestfwd). The test harness uses it to give each scenario's VMs
// their own brokers at the addresses the image config names.
type GuestForward struct {
	NIC       int
	GuestAddr string
	Command   string
}

// DefaultHostAlias is the last octet of the address at which a guest
// reaches the host's loopback on each NIC's network (QEMU's default).
const DefaultHostAlias = 2

// Config describes one VM.
type Config struct {
	Name string
	// BootDisk is the disk image the firmware boots (embassy.img): attached
	// first in the boot order, as a virtio disk with serial EMBASSYBOOT,
	// copy-on-write (the file itself is never written). There is no
	// -kernel: servers boot from disk, and only that way does the firmware
	// enforce Secure Boot (docs/boot-image.md).
	BootDisk string
	// BootDiskWritable attaches BootDisk as it is, written by the guest
	// (an upgrade writes its slots): give the server its own copy.
	BootDiskWritable bool
	// AllowReboot lets a guest reboot restart the firmware in the same
	// QEMU process (an upgrade reboots into its new image); by default a
	// reboot ends QEMU.
	AllowReboot bool
	// StateDir keeps the swtpm state and OVMF VARS across boots of the same
	// "server". Empty means a fresh temp folder removed at Close.
	StateDir string
	// LogDir receives <Name>.serial.log; empty means the state folder.
	LogDir string
	Disks  []string // raw disk image paths, attached as virtio-blk vd0, vd1, ...
	// ReadErrors puts disk i behind QEMU's blkdebug driver, which fails
	// with EIO every read that covers one of the given byte offsets, as a
	// medium with unreadable sectors would.
	ReadErrors map[int][]int64
	NICs       int // default 2
	Forwards   []Forward
	// GuestForwards are further guest addresses served by host commands.
	// A guest address on a NIC's network answers only if it is the host
	// alias, QEMU's DNS address or a GuestForward: anything else there
	// stays unreachable.
	GuestForwards []GuestForward
	// HostAlias is the last octet of the host's address on each NIC's
	// network (default DefaultHostAlias). Moving it frees x.x.x.2 for a
	// GuestForward: QEMU refuses one on the host alias.
	HostAlias int
	MemoryMB  int // default 1024
	// SwtpmCA is the folder of the local CA that signs EK certificates;
	// shared by all VMs so a verifier can trust one manufacturer CA.
	SwtpmCA  string
	OVMFCode string
	OVMFVars string
	// Stdout, if set, also receives every console line.
	Stdout io.Writer
	// SecureBoot boots OVMF's Secure Boot build (SMM on, the VARS flash
	// writable only from SMM); OVMFVars then must enroll keys for it to
	// enforce anything.
	SecureBoot bool
	// ExtraDevices are further -device specifications: hardware someone in
	// the cage added (a PCI card with an option ROM, say).
	ExtraDevices []string
	// RecordTPMBus puts a probe between QEMU and swtpm that records every
	// TPM command and response (TPMBus returns them).
	RecordTPMBus bool
}

// VM is a running virtual machine.
type VM struct {
	cfg       Config
	Started   time.Time
	LogPath   string
	QMP       *QMP
	qemu      *exec.Cmd
	swtpm     *exec.Cmd
	tpmProbe  *tpmBusProbe
	tempDir   string
	logFile   *os.File
	mu        sync.Mutex
	lines     []Line
	newLine   chan struct{}
	qemuDone  chan struct{}
	qemuErr   error
	closeOnce sync.Once
	nextDisk  int
}

// Line is one console line and when it arrived.
type Line struct {
	Text string
	At   time.Time
}

// NICName returns the QMP name of NIC i, for set_link.
func NICName(i int) string { return fmt.Sprintf("nic%d", i) }

// DiskID returns the QMP device id of disk i.
func DiskID(i int) string { return fmt.Sprintf("vd%d", i) }

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Start boots a VM. On error everything started so far is torn down.
func Start(ctx context.Context, cfg Config) (_ *VM, err error) {
	if cfg.Name == "" {
		cfg.Name = "vm"
	}
	if cfg.NICs == 0 {
		cfg.NICs = 2
	}
	if cfg.MemoryMB == 0 {
		cfg.MemoryMB = 1024
	}
	if cfg.HostAlias == 0 {
		cfg.HostAlias = DefaultHostAlias
	}
	if cfg.OVMFCode == "" && cfg.SecureBoot {
		cfg.OVMFCode = SecureBootOVMFCode
	}
	if cfg.OVMFCode == "" {
		cfg.OVMFCode = DefaultOVMFCode
	}
	if cfg.OVMFVars == "" {
		cfg.OVMFVars = DefaultOVMFVars
	}
	if cfg.SwtpmCA == "" {
		return nil, errors.New("vm: SwtpmCA folder is required")
	}
	for _, f := range []string{cfg.BootDisk, cfg.OVMFCode, cfg.OVMFVars} {
		if _, err := os.Stat(f); err != nil {
			return nil, fmt.Errorf("vm %s: %w", cfg.Name, err)
		}
	}
	v := &VM{cfg: cfg, newLine: make(chan struct{}), qemuDone: make(chan struct{})}
	defer func() {
		if err != nil {
			v.Close()
		}
	}()
	// Unix socket paths must stay short, so sockets live in a temp dir.
	v.tempDir, err = os.MkdirTemp("", "embassy-vm-")
	if err != nil {
		return nil, err
	}
	state := cfg.StateDir
	if state == "" {
		state = filepath.Join(v.tempDir, "state")
	}
	if err := os.MkdirAll(filepath.Join(state, "tpm"), 0o700); err != nil {
		return nil, err
	}
	logDir := cfg.LogDir
	if logDir == "" {
		logDir = state
	}
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return nil, err
	}
	v.LogPath = filepath.Join(logDir, cfg.Name+".serial.log")
	v.logFile, err = os.OpenFile(v.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}

	vars := filepath.Join(state, "OVMF_VARS.fd")
	if _, err := os.Stat(vars); err != nil {
		if err := copyFile(cfg.OVMFVars, vars); err != nil {
			return nil, fmt.Errorf("copy OVMF VARS: %w", err)
		}
	}
	tpmState := filepath.Join(state, "tpm")
	if err := SetupTPM(ctx, tpmState, cfg.SwtpmCA); err != nil {
		return nil, err
	}
	tpmSock := filepath.Join(v.tempDir, "tpm.sock")
	v.swtpm = exec.Command("swtpm", "socket", "--tpm2",
		"--tpmstate", "dir="+tpmState,
		"--ctrl", "type=unixio,path="+tpmSock,
		"--log", "file="+filepath.Join(logDir, cfg.Name+".swtpm.log")+",level=1",
		"--terminate")
	v.swtpm.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := v.swtpm.Start(); err != nil {
		return nil, fmt.Errorf("start swtpm: %w", err)
	}
	if err := waitForFile(tpmSock, 10*time.Second); err != nil {
		return nil, fmt.Errorf("swtpm socket: %w", err)
	}

	if cfg.RecordTPMBus {
		probeSock := filepath.Join(v.tempDir, "tpm-probe.sock")
		if v.tpmProbe, err = startTPMBusProbe(probeSock, tpmSock); err != nil {
			return nil, err
		}
		tpmSock = probeSock
	}

	qmpSock := filepath.Join(v.tempDir, "qmp.sock")
	machine := "q35"
	if cfg.SecureBoot {
		machine = "q35,smm=on"
	}
	args := []string{
		"-name", cfg.Name,
		"-machine", machine, "-accel", "tcg",
		"-m", fmt.Sprint(cfg.MemoryMB), "-smp", vcpus(),
		"-cpu", cpuModel(),
		"-nodefaults", "-display", "none",
		"-drive", "if=pflash,format=raw,unit=0,readonly=on,file=" + cfg.OVMFCode,
		"-drive", "if=pflash,format=raw,unit=1,file=" + vars,
		"-chardev", "socket,id=chrtpm,path=" + tpmSock,
		"-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
		"-device", "tpm-tis,tpmdev=tpm0",
		"-serial", "stdio",
		"-qmp", "unix:" + qmpSock + ",server=on,wait=off",
		"-device", "virtio-rng-pci",
	}
	if !cfg.AllowReboot {
		args = append(args, "-no-reboot")
	}
	if cfg.SecureBoot {
		args = append(args, "-global", "driver=cfi.pflash01,property=secure,value=on")
	}
	bootDrive := "if=none,id=bootdisk,format=raw,snapshot=on,file=" + cfg.BootDisk
	if cfg.BootDiskWritable {
		bootDrive = "if=none,id=bootdisk,format=raw,file=" + cfg.BootDisk
	}
	// Its own root port, ahead of the data disks' ports, so that the data
	// disks keep their slots for hot-plug.
	args = append(args,
		"-device", "pcie-root-port,id=rpboot,chassis=9,slot=31",
		"-drive", bootDrive,
		"-device", "virtio-blk-pci,drive=bootdisk,id=boot,serial="+BootDiskSerial+",bus=rpboot,bootindex=0")
	for i := 0; i < cfg.NICs; i++ {
		nd := fmt.Sprintf("user,id=net%d,net=10.0.%d.0/24", i, 2+i)
		if cfg.HostAlias != DefaultHostAlias {
			nd += fmt.Sprintf(",host=10.0.%d.%d", 2+i, cfg.HostAlias)
		}
		for _, f := range cfg.Forwards {
			if f.NIC == i {
				nd += fmt.Sprintf(",hostfwd=tcp:127.0.0.1:%d-:%d", f.HostPort, f.GuestPort)
			}
		}
		for _, f := range cfg.GuestForwards {
			if f.NIC == i {
				if strings.Contains(f.Command, ",") {
					return nil, fmt.Errorf("guest forward %s: command %q has a comma", f.GuestAddr, f.Command)
				}
				nd += fmt.Sprintf(",guestfwd=tcp:%s-cmd:%s", f.GuestAddr, f.Command)
			}
		}
		args = append(args, "-netdev", nd,
			"-device", fmt.Sprintf("virtio-net-pci,netdev=net%d,id=%s,mac=52:54:00:12:34:%02x", i, NICName(i), 0x56+i))
	}
	// Each disk sits behind its own PCIe root port so that it can be
	// hot-unplugged (devices on the q35 root complex cannot), and spare
	// ports take hot-added disks.
	for i := 0; i < len(cfg.Disks)+SpareDiskSlots; i++ {
		args = append(args, "-device", fmt.Sprintf("pcie-root-port,id=%s,chassis=%d,slot=%d", rootPort(i), 10+i, i))
	}
	for i, d := range cfg.Disks {
		drive := fmt.Sprintf("if=none,id=drive%d,format=raw,file=%s", i, d)
		if offs := cfg.ReadErrors[i]; len(offs) > 0 {
			conf := filepath.Join(v.tempDir, fmt.Sprintf("blkdebug%d.conf", i))
			if err := os.WriteFile(conf, []byte(BlkdebugReadErrors(offs)), 0o644); err != nil {
				return nil, err
			}
			drive = fmt.Sprintf("if=none,id=drive%d,format=raw,file.driver=blkdebug,file.config=%s,file.image.driver=file,file.image.filename=%s", i, conf, d)
		}
		args = append(args,
			"-drive", drive,
			"-device", fmt.Sprintf("virtio-blk-pci,drive=drive%d,id=%s,serial=EMBASSY%04d,bus=%s", i, DiskID(i), i, rootPort(i)))
	}
	for _, d := range cfg.ExtraDevices {
		args = append(args, "-device", d)
	}
	v.nextDisk = len(cfg.Disks)
	v.qemu = exec.Command("qemu-system-x86_64", args...)
	v.qemu.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdout, err := v.qemu.StdoutPipe()
	if err != nil {
		return nil, err
	}
	v.qemu.Stderr = &prefixWriter{w: v.logFile, prefix: "[qemu stderr] "}
	fmt.Fprintf(v.logFile, "[harness] %s qemu-system-x86_64 %s\n", time.Now().Format(time.RFC3339Nano), strings.Join(args, " "))
	v.Started = time.Now()
	if err := v.qemu.Start(); err != nil {
		return nil, fmt.Errorf("start qemu: %w", err)
	}
	go v.readConsole(stdout)
	go func() {
		v.qemuErr = v.qemu.Wait()
		close(v.qemuDone)
	}()
	v.QMP, err = DialQMP(qmpSock, 30*time.Second)
	if err != nil {
		return nil, err
	}
	return v, nil
}

func (v *VM) readConsole(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		text := strings.TrimRight(sc.Text(), "\r")
		now := time.Now()
		v.logFile.WriteString(text + "\n")
		if v.cfg.Stdout != nil {
			fmt.Fprintln(v.cfg.Stdout, text)
		}
		v.mu.Lock()
		v.lines = append(v.lines, Line{Text: text, At: now})
		close(v.newLine)
		v.newLine = make(chan struct{})
		v.mu.Unlock()
	}
}

// Lines returns a copy of the console lines so far.
func (v *VM) Lines() []Line {
	v.mu.Lock()
	defer v.mu.Unlock()
	return append([]Line(nil), v.lines...)
}

// ErrExited is returned by WaitFor when QEMU exits first.
var ErrExited = errors.New("qemu exited")

// WaitFor waits for the first console line, from index from on, for which
// match is true, and returns its index and the line.
func (v *VM) WaitFor(ctx context.Context, from int, match func(string) bool) (int, Line, error) {
	for i := from; ; {
		v.mu.Lock()
		lines, ch := v.lines, v.newLine
		v.mu.Unlock()
		for ; i < len(lines); i++ {
			if match(lines[i].Text) {
				return i, lines[i], nil
			}
		}
		select {
		case <-ch:
		case <-v.qemuDone:
			// Drain what arrived before the exit.
			v.mu.Lock()
			n := len(v.lines)
			v.mu.Unlock()
			if i < n {
				continue
			}
			return i, Line{}, fmt.Errorf("%w (%v); console log: %s", ErrExited, v.qemuErr, v.LogPath)
		case <-ctx.Done():
			return i, Line{}, fmt.Errorf("%w; console log: %s", ctx.Err(), v.LogPath)
		}
	}
}

// SetLink takes NIC i's link up or down.
func (v *VM) SetLink(nic int, up bool) error {
	_, err := v.QMP.Execute("set_link", map[string]any{"name": NICName(nic), "up": up})
	return err
}

// BlkdebugReadErrors is a blkdebug configuration that fails reads (EIO)
// covering any of the byte offsets.
func BlkdebugReadErrors(offsets []int64) string {
	var b strings.Builder
	for _, off := range offsets {
		fmt.Fprintf(&b, "[inject-error]\nevent = \"read_aio\"\niotype = \"read\"\nerrno = \"5\"\nsector = \"%d\"\n\n", off/512)
	}
	return b.String()
}

// SpareDiskSlots is how many disks can be hot-added.
const SpareDiskSlots = 2

func rootPort(i int) string { return fmt.Sprintf("rp%d", i) }

// RemoveDisk hot-unplugs disk i, as pulling it from the bay would.
func (v *VM) RemoveDisk(i int) error {
	_, err := v.QMP.Execute("device_del", map[string]any{"id": DiskID(i)})
	return err
}

// AddDisk hot-plugs a raw disk image into the next free slot and returns
// its index.
func (v *VM) AddDisk(path string) (int, error) {
	i := v.nextDisk
	if i >= len(v.cfg.Disks)+SpareDiskSlots {
		return 0, fmt.Errorf("no free disk slot")
	}
	if _, err := v.QMP.Execute("blockdev-add", map[string]any{
		"node-name": fmt.Sprintf("drive%d", i), "driver": "raw",
		"file": map[string]any{"driver": "file", "filename": path},
	}); err != nil {
		return 0, err
	}
	if _, err := v.QMP.Execute("device_add", map[string]any{
		"driver": "virtio-blk-pci", "id": DiskID(i), "drive": fmt.Sprintf("drive%d", i),
		"bus": rootPort(i), "serial": fmt.Sprintf("EMBASSY%04d", i),
	}); err != nil {
		return 0, err
	}
	v.nextDisk++
	return i, nil
}

// HMP runs a human monitor command (for checks such as "info network").
func (v *VM) HMP(cmd string) (string, error) {
	out, err := v.QMP.Execute("human-monitor-command", map[string]any{"command-line": cmd})
	if err != nil {
		return "", err
	}
	var s string
	if err := json.Unmarshal(out, &s); err != nil {
		return "", err
	}
	return s, nil
}

// Kill stops QEMU at once with SIGKILL, as a power cut would.
func (v *VM) Kill() {
	if v.qemu != nil && v.qemu.Process != nil {
		v.qemu.Process.Signal(syscall.SIGKILL)
		<-v.qemuDone
	}
}

// TPMBus returns what crossed the TPM's bus so far, each direction on its
// own: the commands to the TPM and its responses. The VM must have been
// started with RecordTPMBus.
func (v *VM) TPMBus() (toTPM, fromTPM []byte, err error) {
	if v.tpmProbe == nil {
		return nil, nil, errors.New("vm: TPM bus not recorded (Config.RecordTPMBus)")
	}
	return v.tpmProbe.recorded()
}

// PIDs returns the process ids of QEMU and swtpm.
func (v *VM) PIDs() []int {
	var out []int
	for _, c := range []*exec.Cmd{v.qemu, v.swtpm} {
		if c != nil && c.Process != nil {
			out = append(out, c.Process.Pid)
		}
	}
	return out
}

// Exited reports whether QEMU has exited.
func (v *VM) Exited() bool {
	select {
	case <-v.qemuDone:
		return true
	default:
		return false
	}
}

// Close kills QEMU and swtpm (only the processes this VM started), and
// removes the temp folder. It is safe to call more than once.
func (v *VM) Close() {
	v.closeOnce.Do(func() {
		if v.QMP != nil {
			v.QMP.Close()
		}
		if v.qemu != nil && v.qemu.Process != nil {
			v.Kill()
		}
		if v.swtpm != nil && v.swtpm.Process != nil {
			v.swtpm.Process.Signal(syscall.SIGKILL)
			v.swtpm.Wait()
		}
		if v.tpmProbe != nil {
			v.tpmProbe.close()
		}
		if v.logFile != nil {
			v.logFile.Close()
		}
		if v.tempDir != "" {
			os.RemoveAll(v.tempDir)
		}
	})
}

type prefixWriter struct {
	w      io.Writer
	prefix string
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	for _, l := range strings.SplitAfter(string(b), "\n") {
		if l != "" {
			io.WriteString(p.w, p.prefix+l)
		}
	}
	return len(b), nil
}

func waitForFile(path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		} else if time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o600)
}

// DumpMemory writes the guest's physical RAM (from address 0, the VM's
// whole memory size) to path, as someone with the machine's memory in hand
// would read it.
func (v *VM) DumpMemory(path string) error {
	size := int64(v.cfg.MemoryMB) << 20
	// pmemsave may take longer than the QMP default wait for 1 GiB.
	_, err := v.QMP.Execute("pmemsave", map[string]any{"val": 0, "size": size, "filename": path})
	if err != nil {
		return err
	}
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if st.Size() != size {
		return fmt.Errorf("memory dump %s: %d bytes, want %d", path, st.Size(), size)
	}
	return nil
}

// DefaultCPU is the guest CPU model: QEMU's qemu64 with SSSE3 and SSE4,
// which every server CPU has. Under TCG it is measurably faster than bare
// qemu64 where the appliance spends its time: Go's memmove (about 12x) and
// ChaCha20-Poly1305 (about 1.6x) for TLS. AES-NI is left out on purpose:
// with it Go's TLS prefers AES-GCM, whose emulated PCLMULQDQ runs at a
// quarter of ChaCha20's speed, and the kernel's aesni_intel module needs
// PCLMULQDQ and SSE4.1 as well. EMBASSY_QEMU_CPU overrides it for
// experiments (docs/testing.md).
const DefaultCPU = "qemu64,+ssse3,+sse4.1,+sse4.2"

func cpuModel() string {
	if c := os.Getenv("EMBASSY_QEMU_CPU"); c != "" {
		return c
	}
	return DefaultCPU
}

// vcpus is the guest's virtual CPU count: 1, unless EMBASSY_QEMU_SMP says
// otherwise (for experiments; docs/testing.md).
func vcpus() string {
	if n, err := strconv.Atoi(os.Getenv("EMBASSY_QEMU_SMP")); err == nil && n >= 1 && n <= 4 {
		return strconv.Itoa(n)
	}
	return "1"
}

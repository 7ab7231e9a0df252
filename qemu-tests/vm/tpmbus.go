package vm

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
)

// tpmBusProbe sits between QEMU and swtpm, as a probe on a server's TPM
// bus would, and records every byte of every TPM command and response.
//
// QEMU's tpm-emulator backend talks to swtpm's control socket and hands
// it, with CMD_SET_DATAFD, one end of a socket pair over which the TPM
// commands then flow. The probe listens where QEMU expects the control
// socket, relays the control channel to swtpm, and replaces every file
// descriptor QEMU passes with one end of its own socket pair, relaying
// (and recording) the data channel between the two.
type tpmBusProbe struct {
	listener *net.UnixListener
	swtpm    string

	mu             sync.Mutex
	toTPM, fromTPM bytes.Buffer
	err            error
}

// startTPMBusProbe listens on path for QEMU and relays to swtpm's control
// socket at swtpmCtrl.
func startTPMBusProbe(path, swtpmCtrl string) (*tpmBusProbe, error) {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("TPM bus probe: %w", err)
	}
	p := &tpmBusProbe{listener: l, swtpm: swtpmCtrl}
	go p.accept()
	return p, nil
}

func (p *tpmBusProbe) accept() {
	for {
		qemu, err := p.listener.AcceptUnix()
		if err != nil {
			return // closed
		}
		tpm, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: p.swtpm, Net: "unix"})
		if err != nil {
			p.fail(fmt.Errorf("dial swtpm control socket: %w", err))
			qemu.Close()
			continue
		}
		go func() {
			io.Copy(qemu, tpm) // swtpm passes no descriptors back
			qemu.Close()
		}()
		go func() {
			p.relayControl(qemu, tpm)
			tpm.Close()
		}()
	}
}

func (p *tpmBusProbe) fail(err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.err == nil {
		p.err = err
	}
}

// relayControl copies QEMU's control messages to swtpm, swapping each
// passed descriptor for one end of a recorded relay.
func (p *tpmBusProbe) relayControl(qemu, tpm *net.UnixConn) {
	buf := make([]byte, 64<<10)
	oob := make([]byte, syscall.CmsgSpace(4*4))
	for {
		n, oobn, _, _, err := qemu.ReadMsgUnix(buf, oob)
		if err != nil {
			return
		}
		var rights []byte
		if oobn > 0 {
			fds, err := passedFDs(oob[:oobn])
			if err != nil {
				p.fail(err)
				return
			}
			var ours []int
			for _, fd := range fds {
				pair, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
				if err != nil {
					p.fail(fmt.Errorf("socket pair: %w", err))
					return
				}
				go p.relayData(os.NewFile(uintptr(fd), "qemu-tpm-data"), os.NewFile(uintptr(pair[0]), "probe-tpm-data"))
				ours = append(ours, pair[1])
			}
			rights = syscall.UnixRights(ours...)
			_, _, err = tpm.WriteMsgUnix(buf[:n], rights, nil)
			for _, fd := range ours {
				syscall.Close(fd)
			}
			if err != nil {
				return
			}
			continue
		}
		if _, err := tpm.Write(buf[:n]); err != nil {
			return
		}
	}
}

func passedFDs(oob []byte) ([]int, error) {
	msgs, err := syscall.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("TPM control message: %w", err)
	}
	var fds []int
	for i := range msgs {
		got, err := syscall.ParseUnixRights(&msgs[i])
		if err != nil {
			return nil, fmt.Errorf("TPM control message: %w", err)
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

// relayData copies the TPM data channel both ways, recording each
// direction on its own.
func (p *tpmBusProbe) relayData(qemu, tpm *os.File) {
	var wg sync.WaitGroup
	copyRecorded := func(dst, src *os.File, record *bytes.Buffer) {
		defer wg.Done()
		buf := make([]byte, 8<<10)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				p.mu.Lock()
				record.Write(buf[:n])
				p.mu.Unlock()
				if _, werr := dst.Write(buf[:n]); werr != nil {
					break
				}
			}
			if err != nil {
				break
			}
		}
		// Either side gone ends both directions.
		qemu.Close()
		tpm.Close()
	}
	wg.Add(2)
	go copyRecorded(tpm, qemu, &p.toTPM)
	go copyRecorded(qemu, tpm, &p.fromTPM)
	wg.Wait()
}

// recorded returns copies of what went to the TPM and what came back.
func (p *tpmBusProbe) recorded() (toTPM, fromTPM []byte, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.toTPM.Len() == 0 && p.err == nil {
		return nil, nil, errors.New("TPM bus probe recorded nothing")
	}
	return bytes.Clone(p.toTPM.Bytes()), bytes.Clone(p.fromTPM.Bytes()), p.err
}

func (p *tpmBusProbe) close() { p.listener.Close() }

// Command guestfwd joins one guest connection to a TCP address on the
// host: QEMU starts it for each connection a VM opens to a guestfwd
// address, with that connection as standard input, output and error, and
// the test harness names the host address (a scenario's own broker) as
// its one argument. It writes nothing of its own: standard error goes to
// the guest too.
package main

import (
	"io"
	"net"
	"os"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) != 2 {
		os.Exit(2)
	}
	conn, err := net.DialTimeout("tcp", os.Args[1], 10*time.Second)
	if err != nil {
		os.Exit(1) // the guest sees its connection closed
	}
	tcp := conn.(*net.TCPConn)
	done := make(chan struct{})
	go func() {
		io.Copy(tcp, os.Stdin)
		tcp.CloseWrite()
		close(done)
	}()
	io.Copy(os.Stdout, tcp)
	// Standard output is the guest's socket: end that direction.
	syscall.Shutdown(int(os.Stdout.Fd()), syscall.SHUT_WR)
	<-done
}

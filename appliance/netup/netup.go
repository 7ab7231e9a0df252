// Package netup brings the appliance's network up: loopback, then DHCPv4 on
// every NIC in parallel (u-root's dhclient over insomniacslk/dhcp). Each NIC
// keeps its own lease and connected route, so every outbound connection has
// a path per NIC; a NIC without a lease is reported, not fatal.
package netup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"syscall"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/u-root/u-root/pkg/dhclient"
	"github.com/vishvananda/netlink"
)

// Lease is one configured NIC.
type Lease struct {
	Interface string
	Address   string
}

// Up configures loopback and every other link by DHCP.
func Up(ctx context.Context, log *slog.Logger) ([]Lease, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list network links: %w", err)
	}
	var nics []netlink.Link
	for _, l := range links {
		if l.Attrs().Flags&net.FlagLoopback != 0 {
			if err := netlink.LinkSetUp(l); err != nil {
				log.Warn("loopback up failed", "err", err)
			}
			continue
		}
		nics = append(nics, l)
	}
	if len(nics) == 0 {
		return nil, fmt.Errorf("no network interface")
	}
	results := dhclient.SendRequests(ctx, nics, true, false, dhclient.Config{Timeout: 3 * time.Second, Retries: 5}, 20*time.Second)
	var leases []Lease
	for r := range results {
		name := r.Interface.Attrs().Name
		if r.Err != nil {
			log.Warn("DHCP failed", "interface", name, "err", r.Err)
			continue
		}
		if err := r.Lease.Configure(); err != nil && !alreadyConfigured(err) {
			log.Warn("configure lease failed", "interface", name, "err", err)
			continue
		}
		l := Lease{Interface: name, Address: r.Lease.String()}
		if p, ok := r.Lease.(*dhclient.Packet4); ok && p.Lease() != nil {
			l.Address = p.Lease().String()
		}
		log.Info(logmsg.MsgNetworkUp, "interface", name, "address", l.Address)
		leases = append(leases, l)
	}
	if len(leases) == 0 {
		return nil, fmt.Errorf("no NIC got a DHCP lease")
	}
	return leases, nil
}

// alreadyConfigured reports an address or route that is there already (PID
// 1 started afresh after a lockdown), which is fine; u-root's dhclient
// wraps netlink's errno with %w.
func alreadyConfigured(err error) bool { return errors.Is(err, syscall.EEXIST) }

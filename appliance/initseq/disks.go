package initseq

import (
	"context"
	"crypto/rand"
	"log/slog"
	"time"

	"github.com/dataembassy/embassy/appliance/attest"
	"github.com/dataembassy/embassy/appliance/config"
	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/appliance/volumes"
	"github.com/dataembassy/embassy/disks/discover"
)

// Where the kernel lists its block devices and where their nodes are.
const (
	sysBlock = "/sys/block"
	devDir   = "/dev"
)

// disks opens and provisions the appliance's data disks (phase 5).
type disks struct {
	log *slog.Logger
	ac  *attest.Client
	cfg *config.Config
	vm  *volumes.Manager
	// refused are disks the brokers released a key for whose header was
	// refused (their Detail says why); the store counts them failed.
	refused []discover.Disk
}

// open unlocks our disks with the secrets recombined from round and
// provisions blank disks the operators approved. Foreign and boot disks
// are reported and left alone.
// It returns the volumes that were ours already and those provisioned now.
func (p *disks) open(ctx context.Context, round attest.Round) (old, fresh []volumes.Volume) {
	found, err := discover.List(sysBlock, devDir)
	if err != nil {
		p.log.Error("disk discovery failed", "err", err.Error())
		return nil, nil
	}
	keys, cerr := round.Keys(p.cfg.Threshold)
	if cerr != nil {
		p.log.Warn("some disk keys could not be recombined", "err", cerr.Error())
	}
	defer func() {
		for _, k := range keys {
			clear(k)
		}
	}()
	approved := round.DiskApprovals()
	var blank []discover.Disk
	for _, d := range found {
		p.log.Info("disk", "name", d.Name, "kind", d.Kind, "size", d.Size, "serial", d.Serial, "detail", d.Detail)
		switch d.Kind {
		case discover.Ours:
			k, ok := keys[d.LUKSUUID]
			if !ok {
				p.log.Warn("disk stays locked: no key released for it", "disk", d.Name, "uuid", d.LUKSUUID)
				continue
			}
			if _, err := p.vm.Open(d, k); err != nil {
				p.log.Error("unlock failed", "disk", d.Name, "err", err.Error())
			}
		case discover.Blank:
			blank = append(blank, d)
		case discover.Foreign:
			if _, ok := keys[d.LUKSUUID]; ok && d.LUKSUUID != "" {
				p.log.Error(logmsg.MsgDiskRefused, "disk", d.Name, "serial", d.Serial, "uuid", d.LUKSUUID, "reason", d.Detail)
				p.refused = append(p.refused, d)
			}
		}
	}
	if len(blank) > 0 && approved == 0 {
		p.log.Info("blank disks wait for an operator's approval", "count", len(blank), "appliance_id", p.ac.ID())
	}
	old = p.vm.Volumes()
	if len(blank) > 0 && approved > 0 {
		all, ok := p.attestAll(ctx)
		if !ok {
			return old, nil
		}
		for _, d := range blank[:min(len(blank), approved)] {
			if v, ok := p.provision(ctx, all, d); ok {
				fresh = append(fresh, v)
			}
		}
	}
	return old, fresh
}

// reportDisks tells ac the LUKS UUIDs of the disks in our format that are
// present, for the brokers' audit of disks that stay locked.
func reportDisks(log *slog.Logger, ac *attest.Client) {
	found, err := discover.List(sysBlock, devDir)
	if err != nil {
		log.Warn("disk discovery failed", "err", err.Error())
		return
	}
	var ours []string
	for _, d := range found {
		if d.Kind == discover.Ours {
			ours = append(ours, d.LUKSUUID)
		}
	}
	ac.ReportDisks(ours)
}

// provisionRound bounds the round that provisioning waits for every
// broker in: one broker down (or an impostor at its address) must not
// keep the appliance from serving the disks it has the keys for.
const provisionRound = 30 * time.Second

// attestAll attests to every broker: depositing needs every broker's
// attested certificate.
func (p *disks) attestAll(ctx context.Context) (attest.Round, bool) {
	ctx, cancel := context.WithTimeout(ctx, provisionRound)
	defer cancel()
	all, err := p.ac.AttestAll(ctx, attest.Backoff{Initial: time.Second, Max: 5 * time.Second}, len(p.cfg.Brokers))
	if err != nil {
		p.log.Warn("provisioning needs all brokers", "err", err.Error())
		return nil, false
	}
	// Depositing needs the brokers' certificates and approvals, not the
	// shares of the disks already open.
	attest.Round(all).WipeShares()
	return all, true
}

// provisionApproved provisions one approved blank disk while serving (the
// disk watcher's action). It returns the disk approvals left: the deposit
// used one on every broker.
func (p *disks) provisionApproved(ctx context.Context, d discover.Disk) (volumes.Volume, int, bool) {
	all, ok := p.attestAll(ctx)
	if !ok {
		return volumes.Volume{}, 0, false
	}
	v, ok := p.provision(ctx, all, d)
	return v, all.DiskApprovals() - 1, ok
}

// provision gives a blank disk a fresh secret, GPT + LUKS2 and a
// filesystem, deposits the secret's shares with every broker of all and
// opens it. A disk whose shares cannot all be deposited is not used.
func (p *disks) provision(ctx context.Context, all attest.Round, d discover.Disk) (volumes.Volume, bool) {
	secret := make([]byte, 32)
	defer clear(secret)
	if _, err := rand.Read(secret); err != nil {
		p.log.Error("random", "err", err.Error())
		return volumes.Volume{}, false
	}
	p.log.Info("provisioning disk", "disk", d.Name, "serial", d.Serial)
	uuid, err := p.vm.Provision(ctx, d, secret)
	if err != nil {
		p.log.Error("provisioning failed", "disk", d.Name, "err", err.Error())
		return volumes.Volume{}, false
	}
	if err := p.ac.Deposit(ctx, all, uuid, secret); err != nil {
		// Without every share the disk could not be unlocked reliably later:
		// it is not used.
		p.log.Error("share deposit failed; disk not used", "disk", d.Name, "uuid", uuid, "err", err.Error())
		return volumes.Volume{}, false
	}
	p.log.Info("disk provisioned, shares deposited", "disk", d.Name, "serial", d.Serial, "uuid", uuid)
	nd, err := discover.Classify(d.Path)
	if err != nil || nd.Kind != discover.Ours {
		p.log.Error("provisioned disk does not classify as ours", "disk", d.Name)
		return volumes.Volume{}, false
	}
	nd.Name, nd.Serial = d.Name, d.Serial
	v, err := p.vm.Open(*nd, secret)
	if err != nil {
		p.log.Error("unlock of new disk failed", "disk", d.Name, "err", err.Error())
		return volumes.Volume{}, false
	}
	return v, true
}

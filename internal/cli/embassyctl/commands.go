package embassyctl

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/images/manifest"
	"github.com/dataembassy/embassy/internal/cli"
	"github.com/dataembassy/embassy/operator/opclient"
	"github.com/dataembassy/embassy/protocol/api"
	"github.com/dataembassy/embassy/protocol/identity"
)

func dirArgs(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
	return nil, cobra.ShellCompDirectiveFilterDirs
}

func noFileArgs(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
	return nil, cobra.ShellCompDirectiveNoFileComp
}

// changeCmds are the commands that send one change to every broker.
func changeCmds(o *options) []*cobra.Command {
	var count int
	approveDisk := o.brokerCmd(&cobra.Command{
		Use:   "approve-disk [--count N] APPLIANCE-ID",
		Short: "Let an appliance provision N blank disks (first set-up or a replacement)",
		Long: `approve-disk lets the appliance take N blank disks into its store: the
appliance formats them only with every broker's approval and deposits a
share of each new disk key with every broker.`,
		Example: `  embassyctl approve-disk --count 2 3f9c...e1
  embassyctl approve-disk 3f9c...e1    # one replacement disk`,
		Args: cli.ExactArgs(1), ValidArgsFunction: noFileArgs,
	}, func(ctx context.Context, c *conn, args []string) error {
		outs, err := c.client.ApproveDisks(ctx, args[0], count)
		return c.printChange("approve-disk", outs, err)
	})
	approveDisk.Flags().IntVar(&count, "count", 1, "number of new disks")

	return []*cobra.Command{
		o.brokerCmd(&cobra.Command{
			Use:   "enroll APPLIANCE-ID",
			Short: "Approve an activated appliance's enrollment",
			Long: `enroll approves an appliance whose enrollment request the brokers hold
(the appliance logs "enrollment requested" with its id). Until then no
broker releases anything to it.`,
			Example: `  embassyctl enroll 3f9c...e1`,
			Args:    cli.ExactArgs(1), ValidArgsFunction: noFileArgs,
		}, func(ctx context.Context, c *conn, args []string) error {
			outs, err := c.client.ApproveEnrollment(ctx, args[0])
			return c.printChange("enroll "+args[0], outs, err)
		}),
		o.brokerCmd(&cobra.Command{
			Use:   "approve-image IMAGE-DIR",
			Short: "Approve the signed image in a folder built by mkimage",
			Long: `approve-image sends the signed manifest (manifest.json and manifest.sig) of
an image folder to every broker; appliances booted from that image can then
attest.`,
			Example: `  embassyctl approve-image out`,
			Args:    cli.ExactArgs(1), ValidArgsFunction: dirArgs,
		}, func(ctx context.Context, c *conn, args []string) error {
			if err := cli.RequireImageDir(args[0]); err != nil {
				return err
			}
			m, err := os.ReadFile(filepath.Join(args[0], manifest.File))
			if err != nil {
				return err
			}
			s, err := os.ReadFile(filepath.Join(args[0], manifest.SignatureFile))
			if err != nil {
				return err
			}
			outs, err := c.client.ApproveImage(ctx, m, s)
			return c.printChange("approve-image", outs, err)
		}),
		o.brokerCmd(&cobra.Command{
			Use:     "set-endpoints APPLIANCE-ID IP:PORT[,IP:PORT...]",
			Short:   "Set the addresses an appliance's twins replicate to it at",
			Example: `  embassyctl set-endpoints 3f9c...e1 10.0.2.2:9443,10.0.3.2:9444`,
			Args:    cli.ExactArgs(2), ValidArgsFunction: noFileArgs,
		}, func(ctx context.Context, c *conn, args []string) error {
			outs, err := c.client.SetEndpoints(ctx, args[0], strings.Split(args[1], ","))
			return c.printChange("set-endpoints", outs, err)
		}),
		o.brokerCmd(&cobra.Command{
			Use:     "set-floor APPLIANCE-ID VERSION",
			Short:   "Refuse images below VERSION to an appliance (anti-rollback)",
			Example: `  embassyctl set-floor 3f9c...e1 7`,
			Args:    cli.ExactArgs(2), ValidArgsFunction: noFileArgs,
		}, func(ctx context.Context, c *conn, args []string) error {
			v, err := strconv.ParseUint(args[1], 10, 64)
			if err != nil || v == 0 {
				return &cli.UsageError{Msg: fmt.Sprintf("version %q is not a positive integer", args[1])}
			}
			outs, err := c.client.SetFloor(ctx, args[0], v)
			return c.printChange("set-floor", outs, err)
		}),
		approveDisk,
		newApproveFirmwareCmd(o),
		newRevokeCmd(o),
		newDecommissionCmd(o),
		newUpgradeCmd(o),
		newReplaceCmd(o),
	}
}

func newReplaceCmd(o *options) *cobra.Command {
	var threshold int
	var catchUp, maxAge time.Duration
	var acceptLoss bool
	cmd := o.brokerCmd(&cobra.Command{
		Use:   "replace --threshold K [--catch-up D] [--accept-loss] OLD-ID NEW-ID",
		Short: "Put a new server, enrolled at home, in an old one's place; then decommission the old one",
		Long: `replace approves at every broker as many blank disks for NEW-ID as OLD-ID
had and gives NEW-ID OLD-ID's endpoints. NEW-ID must be enrolled already (at
home, before shipping). Once racked, NEW-ID provisions its disks and its
twin fills it. No single broker's word counts: when K brokers' fresh
reports (made since the command began, at most --max-report-age old) show
NEW-ID's disks in service and K brokers' fresh reports of every twin show
nothing pending for it (steadily for 45 s), the old server's newest
reports are read. Unless K brokers agree its peers lacked nothing it
stored (and no broker holds a newer report saying otherwise), OLD-ID is
left as it was; --accept-loss decommissions it anyway and the report says
how many bytes were lost, as of when. Then OLD-ID is decommissioned
without a drain: revoked at every broker, its shares destroyed, so its
disks can never be opened again. If NEW-ID has not caught up within
--catch-up, OLD-ID is left as it was; run the command again. Every broker
audits each step with your custodian identity.`,
		Example: `  embassyctl replace --threshold 2 --catch-up 2h --timeout 3h 3f9c...e1 7a01...44`,
		Args:    cli.ExactArgs(2), ValidArgsFunction: noFileArgs,
	}, func(ctx context.Context, c *conn, args []string) error {
		// The report's "unreadable" depends on k: a guessed k could call a
		// disk unreadable that k surviving shares still open.
		k := threshold
		if k < 1 || k > len(c.client.Brokers) {
			return &cli.UsageError{Msg: fmt.Sprintf("--threshold K is needed: the image's k (1 to %d)", len(c.client.Brokers))}
		}
		opts := opclient.ReplaceOptions{Threshold: k, CatchUp: catchUp, MaxReportAge: maxAge, AcceptLoss: acceptLoss}
		if !c.asJSON {
			opts.Progress = c.out
		}
		rep, err := c.client.Replace(ctx, args[0], args[1], opts)
		if c.asJSON {
			opclient.PrintJSON(c.out, rep)
		} else if rep != nil {
			opclient.PrintReplace(c.out, rep)
		}
		switch {
		case errors.Is(err, opclient.ErrBadOption):
			return &cli.UsageError{Msg: err.Error()}
		case errors.Is(err, opclient.ErrUnreplicated):
			return cli.Next(err, "if %s still runs, let it replicate and run replace again; if it is gone for good, --accept-loss decommissions it and loses that data", args[0])
		}
		return err
	})
	cmd.Flags().IntVar(&threshold, "threshold", 0, "the image's k (required)")
	cmd.Flags().DurationVar(&catchUp, "catch-up", 50*time.Second, "how long to wait for the new server to catch up (give --timeout more)")
	cmd.Flags().DurationVar(&maxAge, "max-report-age", opclient.DefaultMaxReportAge, "how old a broker's health report may be and still count")
	cmd.Flags().BoolVar(&acceptLoss, "accept-loss", false, "decommission the old server even if its newest reports show data its peers lack")
	return cmd
}

func newUpgradeCmd(o *options) *cobra.Command {
	var threshold int
	var addr, clientCert string
	var wait time.Duration
	cmd := o.brokerCmd(&cobra.Command{
		Use:   "upgrade --address HOST:PORT --client-cert FILE [--wait D] APPLIANCE-ID IMAGE-DIR",
		Short: "Approve a new image and push it to an appliance, which reboots into it",
		Long: `upgrade approves the image in IMAGE-DIR (what 'mkimage build' wrote) at every
broker in the list (each with your credential for it; an image counts where
k brokers' custodians approved it), then pushes it to the appliance at
--address over TLS, believing the appliance's key only where --threshold
brokers vouch for it, with --client-cert (a certificate and key of the
home-state client CA, PEM). The appliance checks the signature, that the
image is newer than the one it runs and that k brokers approve it, writes
it to its boot disk's trial slot, makes that the one-shot next boot and
reboots when replication has caught up. Once the new image attests, each
broker raises the appliance's floor to its version, so the old image never
gets keys again; an image that does not come up is never committed and the
firmware boots the old one. With --wait the command follows the appliance
until k brokers saw it attest on the new version.`,
		Example: `  embassyctl upgrade --address 192.0.2.10:8443 --client-cert ops.pem --wait 10m 3f9c...e1 release-8/`,
		Args:    cli.ExactArgs(2),
	}, func(ctx context.Context, c *conn, args []string) error {
		id, dir := args[0], args[1]
		if err := api.CheckApplianceID(id); err != nil {
			return &cli.UsageError{Msg: err.Error()}
		}
		if addr == "" || clientCert == "" {
			return &cli.UsageError{Msg: "--address and --client-cert are needed"}
		}
		ids, err := c.verifier("upgrade", threshold)
		if err != nil {
			return err
		}
		k := ids.Threshold
		img, err := opclient.LoadUpgradeImage(dir)
		if err != nil {
			return cli.Next(fmt.Errorf("image folder: %w", err), "run `mkimage build --out %s --version N` first", dir)
		}
		cert, err := tls.LoadX509KeyPair(clientCert, clientCert)
		if err != nil {
			return fmt.Errorf("--client-cert: %w", err)
		}
		outs, aerr := c.client.ApproveImage(ctx, img.Manifest, img.Signature)
		opclient.PrintOutcomes(c.out, "approve-image", outs)
		if approved := opclient.CountOK(outs); approved < k {
			return fmt.Errorf("image %d approved at %d brokers, %d needed: %w", img.Version, approved, k, aerr)
		}
		resp, err := opclient.PushUpgrade(ctx, addr, id, img, cert, ids)
		if resp != nil {
			fmt.Fprintf(c.out, "appliance %s: running %d, %s %d (approved at %v) %s\n", resp.ApplianceID, resp.Running, resp.State, img.Version, resp.ApprovedAt, resp.Error)
		}
		if err != nil || wait <= 0 {
			return err
		}
		deadline := time.Now().Add(wait)
		for {
			prog := c.client.Progress(ctx, id)
			if opclient.Upgraded(prog, img.Version, k) {
				for _, p := range prog {
					fmt.Fprintf(c.out, "  %s: running %d, floor %d\n", p.Broker, p.Running, p.Floor)
				}
				fmt.Fprintf(c.out, "appliance %s runs image %d; its floor is %d at %d or more brokers\n", id, img.Version, img.Version, k)
				return nil
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("appliance %s did not attest on image %d within %s (the firmware boots the old image if the new one failed)", id, img.Version, wait)
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(5 * time.Second):
			}
		}
	})
	cmd.Flags().StringVar(&addr, "address", "", "HOST:PORT of the appliance's ingest service")
	cmd.Flags().StringVar(&clientCert, "client-cert", "", "PEM file with a home-state client CA certificate and its key")
	cmd.Flags().IntVar(&threshold, "threshold", 0, "the image's k (default: a majority of the list)")
	cmd.Flags().DurationVar(&wait, "wait", 0, "follow the appliance until k brokers saw it attest on the new image (give --timeout more)")
	return cmd
}

func newDecommissionCmd(o *options) *cobra.Command {
	var threshold int
	var drain, maxAge time.Duration
	var force bool
	cmd := o.brokerCmd(&cobra.Command{
		Use:   "decommission --threshold K [--drain D | --force] APPLIANCE-ID",
		Short: "Take an appliance out of service for good: drain, revoke, destroy its disks' shares",
		Long: `decommission waits until K brokers' reports, each made after the command
began and at most --max-report-age old, agree that the appliance's peers
hold everything it stored (no single broker's word counts, and an
appliance with no peers is never drained), then revokes it at every
broker (it locks down at its next attestation and never enrolls again)
and has every broker destroy its shares of the appliance's disks. The
report names each disk by id and serial and says whether it is now
unreadable for good: fewer than K brokers (the image's threshold) may
still hold a share of it. A drain that does not finish within --drain
revokes nothing and names the brokers that did not agree; --force skips
the wait (data its twin lacks is lost; the report says how much, as of
when). The whole command is also bounded by --timeout: give it more than
--drain.`,
		Example: `  embassyctl decommission --threshold 2 --timeout 15m --drain 10m 3f9c...e1
  embassyctl decommission --threshold 2 --force 3f9c...e1`,
		Args: cli.ExactArgs(1), ValidArgsFunction: noFileArgs,
	}, func(ctx context.Context, c *conn, args []string) error {
		// The report's "unreadable" depends on k: a guessed k could call a
		// disk unreadable that k surviving shares still open.
		k := threshold
		if k < 1 || k > len(c.client.Brokers) {
			return &cli.UsageError{Msg: fmt.Sprintf("--threshold K is needed: the image's k (1 to %d)", len(c.client.Brokers))}
		}
		if !force && drain <= 0 {
			return &cli.UsageError{Msg: "--drain must be positive (or pass --force)"}
		}
		opts := opclient.DecommissionOptions{Threshold: k, Drain: drain, Force: force, MaxReportAge: maxAge}
		if !c.asJSON {
			opts.Progress = c.out
		}
		rep, err := c.client.Decommission(ctx, args[0], opts)
		if rep != nil && (rep.Revoked != nil || err == nil) {
			if c.asJSON {
				opclient.PrintJSON(c.out, rep)
			} else {
				opclient.PrintDecommission(c.out, rep)
			}
		}
		switch {
		case errors.Is(err, opclient.ErrBadOption):
			return &cli.UsageError{Msg: err.Error()}
		case errors.Is(err, opclient.ErrNoPeers):
			return cli.Next(err, "no copy of its data exists elsewhere; --force decommissions it anyway and loses that data")
		case errors.Is(err, opclient.ErrNotDrained):
			return cli.Next(err, "retry with a longer --drain once its twin is reachable, or --force to revoke at once and lose what its peers lack")
		}
		return err
	})
	cmd.Flags().IntVar(&threshold, "threshold", 0, "the image's k: a disk is unreadable once fewer than K brokers hold a share (required)")
	cmd.Flags().DurationVar(&drain, "drain", 50*time.Second, "how long to wait for the appliance to be drained")
	cmd.Flags().BoolVar(&force, "force", false, "revoke at once, without waiting for the drain")
	cmd.Flags().DurationVar(&maxAge, "max-report-age", opclient.DefaultMaxReportAge, "how old a broker's health report may be and still count")
	return cmd
}

func newApproveFirmwareCmd(o *options) *cobra.Command {
	var digest string
	var rejectIt bool
	cmd := o.brokerCmd(&cobra.Command{
		Use:   "approve-firmware [--digest D | --reject --digest D] APPLIANCE-ID",
		Short: "Review, then adopt or discard, an appliance's changed platform firmware measurements",
		Long: `approve-firmware shows, per broker, how the platform PCRs (0-3, 5-7) of the
appliance's boot that the broker refused with code firmware differ from the
reference it recorded at enrollment, with the digest of that measurement.
Without --digest it only shows them. With --digest D every broker whose
pending measurement has digest D makes it the new reference; a broker
holding another one refuses (firmware_digest), so what you reviewed is what
is adopted even if someone in the cage booted something else meanwhile.
With --reject --digest D the pending measurement is discarded instead.
Check the differing events (a firmware update, a changed Secure Boot
database, boot variables, an added card's option ROM) before approving: an
unexplained change may be tampering.`,
		Example: `  embassyctl approve-firmware 3f9c...e1                      # review: differences and digest
  embassyctl approve-firmware --digest 8d2e...07 3f9c...e1   # adopt what you reviewed
  embassyctl approve-firmware --reject --digest 8d2e...07 3f9c...e1`,
		Args: cli.ExactArgs(1), ValidArgsFunction: noFileArgs,
	}, func(ctx context.Context, c *conn, args []string) error {
		if err := api.CheckApplianceID(args[0]); err != nil {
			return &cli.UsageError{Msg: err.Error()}
		}
		if rejectIt && digest == "" {
			return &cli.UsageError{Msg: "--reject needs the --digest of the measurement to discard"}
		}
		states := c.client.Firmware(ctx, args[0])
		if digest == "" {
			if c.asJSON {
				opclient.PrintJSON(c.out, map[string]any{"firmware": states})
			} else {
				opclient.PrintFirmware(c.out, args[0], states)
				fmt.Fprintf(c.out, "nothing changed; after review: embassyctl approve-firmware --digest DIGEST %s\n", args[0])
			}
			return nil
		}
		action, call := "approve-firmware", c.client.ApproveFirmware
		if rejectIt {
			action, call = "reject-firmware", c.client.RejectFirmware
		}
		outs, err := call(ctx, args[0], digest)
		if c.asJSON {
			opclient.PrintJSON(c.out, map[string]any{"firmware": states, "outcomes": outs})
			return err
		}
		opclient.PrintFirmware(c.out, args[0], states)
		opclient.PrintOutcomes(c.out, action, outs)
		return err
	})
	cmd.Flags().StringVar(&digest, "digest", "", "digest of the pending measurement you reviewed (shown without this flag)")
	cmd.Flags().BoolVar(&rejectIt, "reject", false, "discard the pending measurement instead of adopting it")
	return cmd
}

func newRevokeCmd(o *options) *cobra.Command {
	var destroy bool
	cmd := o.brokerCmd(&cobra.Command{
		Use:   "revoke [--destroy-shares] APPLIANCE-ID",
		Short: "Revoke an appliance: no broker releases anything to it again",
		Long: `revoke revokes an appliance on every broker: it is refused and told to lock
down at every attestation, and its EK never enrolls again.

With --destroy-shares every broker then deletes the key shares it holds for
the appliance's disks (crypto-shredding) and says which disks' shares are
gone. This cannot be undone: once more than n-k brokers destroyed their
shares, the disks' data cannot be decrypted by anyone. A broker that missed
the revocation refuses the destruction (not_revoked); run the command again.`,
		Example: `  embassyctl revoke 3f9c...e1
  embassyctl revoke --destroy-shares 3f9c...e1`,
		Args: cli.ExactArgs(1), ValidArgsFunction: noFileArgs,
	}, func(ctx context.Context, c *conn, args []string) error {
		outs, err := c.client.Revoke(ctx, args[0])
		if !destroy {
			return c.printChange("revoke", outs, err)
		}
		ds, derr := c.client.DestroyShares(ctx, args[0])
		if c.asJSON {
			opclient.PrintJSON(c.out, map[string]any{"revoke": outs, "destroy_shares": ds})
		} else {
			opclient.PrintOutcomes(c.out, "revoke", outs)
			opclient.PrintDestructions(c.out, ds)
		}
		return errors.Join(err, derr)
	})
	cmd.Flags().BoolVar(&destroy, "destroy-shares", false, "after revoking, delete every broker's key shares of the appliance's disks (irreversible)")
	return cmd
}

func newAttestCmd(o *options) *cobra.Command {
	threshold := 0
	cmd := o.brokerCmd(&cobra.Command{
		Use:   "attest HOST:PORT",
		Short: "Check a running appliance's attestation yourself",
		Long: `attest asks the appliance at HOST:PORT for a fresh TPM quote and checks it
against the images the brokers approved; it fails unless the kernel,
command line and initrd all match. The appliance's TLS key counts only if
--threshold brokers, each through its own CA (the --ca of its list entry),
issued a certificate for it: one broker's CA alone is never believed.`,
		Example: `  embassyctl attest 192.0.2.10:8443
  embassyctl attest --json 127.0.0.1:8443`,
		Args: cli.ExactArgs(1), ValidArgsFunction: noFileArgs,
	}, func(ctx context.Context, c *conn, args []string) error {
		ids, err := c.verifier("attest", threshold)
		if err != nil {
			return err
		}
		v, err := c.client.AttestAppliance(ctx, args[0], ids)
		if err != nil {
			return err
		}
		if c.asJSON {
			opclient.PrintJSON(c.out, v)
		} else {
			opclient.PrintVerdict(c.out, v)
		}
		if !v.Pass {
			return fmt.Errorf("appliance %s failed the attestation check", v.ApplianceID)
		}
		return nil
	})
	cmd.Flags().IntVar(&threshold, "threshold", 0, "brokers that must vouch for the appliance's TLS key: the image's k (default: a majority of the list)")
	return cmd
}

func newStatusCmd(o *options) *cobra.Command {
	return o.brokerCmd(&cobra.Command{
		Use:   "status",
		Short: "Show each broker's appliances, disks, health and approved images",
		Example: `  embassyctl status
  embassyctl status --json`,
		Args: cli.ExactArgs(0), ValidArgsFunction: noFileArgs,
	}, func(ctx context.Context, c *conn, _ []string) error {
		st := c.client.Status(ctx)
		if c.asJSON {
			return opclient.PrintJSON(c.out, st)
		}
		opclient.PrintStatus(c.out, st)
		return nil
	})
}

func newAuditCmd(o *options) *cobra.Command {
	auditCmd := cli.Group(&cobra.Command{
		Use:   "audit",
		Short: "Show or verify the brokers' hash-chained audit logs and signed heads",
		Example: `  embassyctl audit show
  embassyctl audit verify
  embassyctl audit verify --heads ~/ops/audit-heads.json
  embassyctl audit verify --file audit.log --head 42:9b1f...c0`,
	})
	online := func(entries bool) func(context.Context, *conn, []string) error {
		return func(ctx context.Context, c *conn, _ []string) error {
			logs := c.client.Audit(ctx)
			if c.asJSON {
				opclient.PrintJSON(c.out, logs)
			} else {
				opclient.PrintAudit(c.out, logs, entries)
			}
			for _, l := range logs {
				if !l.Verified {
					return fmt.Errorf("audit log of %s does not verify", l.Broker)
				}
			}
			return nil
		}
	}
	show := o.brokerCmd(&cobra.Command{
		Use:     "show",
		Short:   "Print every broker's audit log entries (with who acted) and verify each chain",
		Example: `  embassyctl audit show`,
		Args:    cli.ExactArgs(0), ValidArgsFunction: noFileArgs,
	}, online(true))

	var file, head, headsPath string
	verifyCmd := o.brokerCmd(&cobra.Command{
		Use:   "verify [--heads FILE] | verify --file FILE [--head SEQ:HASH]",
		Short: "Verify every broker's signed audit head and chain against the heads verified before",
		Long: `verify fetches each broker's audit log and signed head and checks that the
head's signature verifies under the audit key pinned for the broker in the
broker list, that the chain verifies from the first entry up to the signed
head, and that every head recorded in the heads file by earlier checks is
still in the chain at its sequence number. A broker admin who edits the
database and the log together and recomputes the chain is caught there:
the entries operators verified before no longer hash the same.

Per broker it prints ok, REWRITTEN (the entry that differs), ROLLED BACK
(the log ends before an entry verified before), BAD SIGNATURE, CHAIN BROKEN,
NO PINNED KEY or UNREACHABLE, and it fails unless every broker is ok. The
signed head of each broker that passed is appended to the heads file
(written atomically; by default audit-heads.json next to the --brokers
list). Keep that file, and a copy away from the brokers.

With --file it checks an exported log (JSON lines) offline instead, against
--head if given; that needs no broker list or certificate.`,
		Example: `  embassyctl audit verify
  embassyctl audit verify --heads ~/ops/audit-heads.json
  embassyctl audit verify --file audit.log --head 42:9b1f...c0`,
		Args: cli.ExactArgs(0), ValidArgsFunction: noFileArgs,
	}, func(ctx context.Context, c *conn, _ []string) error {
		return verifyHeads(ctx, c, o.headsFile(headsPath))
	})
	runOnline := verifyCmd.RunE
	verifyCmd.RunE = func(cmd *cobra.Command, args []string) error {
		if file != "" {
			return verifyFile(cmd, file, head, o.asJSON)
		}
		// A malformed heads file is refused before any broker is asked.
		if _, err := opclient.LoadHeads(o.headsFile(headsPath)); err != nil {
			return err
		}
		return runOnline(cmd, args)
	}
	verifyCmd.Flags().StringVar(&headsPath, "heads", "", "the signed audit heads verified before, appended to (default audit-heads.json next to the --brokers list)")
	verifyCmd.Flags().StringVar(&file, "file", "", "exported audit log file (JSON lines) to check offline")
	verifyCmd.Flags().StringVar(&head, "head", "", "expected head as SEQ:HASH (from the broker or an earlier check)")
	verifyCmd.MarkFlagFilename("file")
	verifyCmd.MarkFlagFilename("heads", "json")
	auditCmd.AddCommand(show, verifyCmd)
	return auditCmd
}

// headsFile is the heads file: --heads, else audit-heads.json next to the
// broker list (the operator's embassyctl configuration).
func (o *options) headsFile(flag string) string {
	if flag != "" {
		return flag
	}
	return filepath.Join(filepath.Dir(o.brokersPath), HeadsFile)
}

// HeadsFile is the default name of the audit heads file.
const HeadsFile = "audit-heads.json"

// ErrAuditFailed is returned by audit verify when a broker is not ok.
var ErrAuditFailed = errors.New("audit check failed")

// verifyHeads checks every broker's signed head and chain against the
// heads file at path and records the heads that passed.
func verifyHeads(ctx context.Context, c *conn, path string) error {
	heads, err := opclient.LoadHeads(path)
	if err != nil {
		return err
	}
	verdicts, changed := c.client.VerifyHeads(ctx, heads)
	if changed {
		if err := opclient.SaveHeads(path, heads); err != nil {
			return err
		}
	}
	if c.asJSON {
		opclient.PrintJSON(c.out, verdicts)
	} else {
		opclient.PrintHeadVerdicts(c.out, verdicts)
		if changed {
			fmt.Fprintf(c.out, "signed heads recorded in %s\n", path)
		}
	}
	var failed []string
	for _, v := range verdicts {
		if !v.OK() {
			failed = append(failed, fmt.Sprintf("%s %s", v.Broker, v.Status))
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("%w: %s", ErrAuditFailed, strings.Join(failed, ", "))
	}
	return nil
}

// verifyFile checks an exported audit log file offline.
func verifyFile(cmd *cobra.Command, file, headArg string, asJSON bool) error {
	out := cmd.OutOrStdout()
	var want *audit.Head
	if headArg != "" {
		seq, hash, ok := strings.Cut(headArg, ":")
		n, perr := strconv.ParseUint(seq, 10, 64)
		if !ok || perr != nil || len(hash) != 64 {
			return &cli.UsageError{Msg: fmt.Sprintf("--head %q must be SEQ:HASH", headArg)}
		}
		want = &audit.Head{Seq: n, Hash: hash}
	}
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	entries, err := audit.Read(f)
	if err != nil {
		return err
	}
	head, err := audit.Verify(entries, want)
	if asJSON {
		opclient.PrintJSON(out, map[string]any{"entries": len(entries), "head": head, "verified": err == nil})
	} else if err == nil {
		fmt.Fprintf(out, "%s: %d entries, head %d %s: chain verified\n", file, len(entries), head.Seq, head.Hash)
	}
	return err
}

func newBrokersCmd(o *options) *cobra.Command {
	b := cli.Group(&cobra.Command{
		Use:   "brokers",
		Short: "Write or show the broker list the other commands use (--brokers)",
		Example: `  embassyctl brokers add broker-a https://broker-a.example:8441 --ca broker-ca.pem --cert a.pem --key a.key
  embassyctl brokers list`,
	})
	var auditKey, caFile, certFile, keyFile string
	add := &cobra.Command{
		Use:   "add NAME https://HOST:PORT --ca FILE --cert FILE --key FILE [--audit-key FILE]",
		Short: "Add a broker to the broker list with your custodian credential for it (and pin its audit key), creating the list",
		Long: `add appends a broker to the broker list: its operator URL, --ca the CA
bundle that verifies the broker's TLS certificate (the home-state broker
CA), and --cert and --key your custodian certificate and key for this
broker, issued by its own custodian CA ('keybroker custodian add'). Each
broker accepts only its own custodians, so you add each broker with the
credential its admin issued you; a broker you are no custodian of belongs
in another custodian's list, not yours. The list records the files' paths
(made absolute), not their contents.

--audit-key pins the broker's audit signing public key (the
audit-signing.pub that 'keybroker init' wrote in the broker's state folder;
get it from the broker's admin over a channel you trust): 'embassyctl
audit verify' checks the broker's signed audit heads with it.

Without --cert and --key the entry uses the global --cert and --key, as
lists from before custodians did.`,
		Example: `  embassyctl brokers add broker-a https://broker-a.example:8441 \
      --ca broker-ca.pem --cert alice@broker-a.pem --key alice@broker-a.key --audit-key broker-a-audit.pub
  embassyctl --brokers ops/brokers.json brokers add broker-b https://10.0.0.6:8441 \
      --ca broker-ca.pem --cert alice@broker-b.pem --key alice@broker-b.key`,
		Args: cli.ExactArgs(2), ValidArgsFunction: noFileArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			br := opclient.Broker{Name: args[0], URL: args[1]}
			if err := checkNameURL(br); err != nil {
				return err
			}
			for _, f := range []struct{ from, to *string }{{&caFile, &br.CA}, {&certFile, &br.Cert}, {&keyFile, &br.Key}} {
				if *f.from == "" {
					continue
				}
				abs, err := filepath.Abs(*f.from)
				if err != nil {
					return err
				}
				*f.to = abs
			}
			if err := br.Check(); err != nil {
				return cli.Next(err, "pass --ca (the broker CA bundle) and --cert and --key (your custodian credential for %s: `keybroker custodian add --dir DIR --name YOU` on that broker issues one)", args[0])
			}
			if auditKey != "" {
				pub, err := loadAuditKey(auditKey)
				if err != nil {
					return err
				}
				br.AuditKey = pub
			}
			n, err := addBroker(o.brokersPath, br)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "broker %s added to %s (%d in the list)\n", args[0], o.brokersPath, n)
			return nil
		},
	}
	add.Flags().StringVar(&auditKey, "audit-key", "", "the broker's audit signing public key (audit-signing.pub, PEM) to pin")
	add.Flags().StringVar(&caFile, "ca", "", "CA bundle that verifies the broker's TLS certificate (PEM)")
	add.Flags().StringVar(&certFile, "cert", "", "your custodian certificate for this broker, from its custodian CA (PEM)")
	add.Flags().StringVar(&keyFile, "key", "", "the key of --cert (PEM)")
	add.MarkFlagFilename("audit-key", "pub", "pem")
	add.MarkFlagFilename("ca", "pem")
	add.MarkFlagFilename("cert", "pem")
	add.MarkFlagFilename("key", "key", "pem")
	pin := &cobra.Command{
		Use:   "pin-audit-key NAME FILE",
		Short: "Pin the audit signing public key of a broker already in the list",
		Long: `pin-audit-key records the broker's audit signing public key (PEM, the
audit-signing.pub of its state folder, or what 'keybroker audit-key'
prints) in the broker list. It refuses to replace a different pinned key:
a broker whose key changed signs heads nobody verified; edit the list by
hand only once you know why.`,
		Example: `  embassyctl brokers pin-audit-key broker-a broker-a-audit.pub`,
		Args:    cli.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			pub, err := loadAuditKey(args[1])
			if err != nil {
				return err
			}
			if err := pinAuditKey(o.brokersPath, args[0], pub); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "audit key of broker %s pinned in %s\n", args[0], o.brokersPath)
			return nil
		},
	}
	b.AddCommand(add, pin, &cobra.Command{
		Use:     "list",
		Short:   "Print the broker list",
		Example: `  embassyctl brokers list --json`,
		Args:    cli.ExactArgs(0), ValidArgsFunction: noFileArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			brokers, err := opclient.LoadBrokers(o.brokersPath)
			if errors.Is(err, fs.ErrNotExist) {
				return cli.Next(fmt.Errorf("no broker list: %w", err),
					"run `embassyctl brokers add NAME https://HOST:PORT --ca FILE --cert FILE --key FILE` once per broker, or pass --brokers FILE")
			}
			if err != nil {
				return err
			}
			if o.asJSON {
				return opclient.PrintJSON(cmd.OutOrStdout(), brokers)
			}
			for _, br := range brokers {
				line := fmt.Sprintf("%-12s %s", br.Name, br.URL)
				if br.HasCert() {
					line += "  custodian cert " + br.Cert
				}
				if len(br.AuditKey) > 0 {
					sum := sha256.Sum256(br.AuditKey)
					line += fmt.Sprintf("  audit key sha256:%x", sum[:8])
				}
				fmt.Fprintln(cmd.OutOrStdout(), line)
			}
			return nil
		},
	})
	return b
}

// loadAuditKey reads a broker's audit signing public key (PKIX PEM).
func loadAuditKey(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read audit public key: %w", err)
	}
	pub, err := audit.ParsePublicKey(b)
	if err != nil {
		return nil, cli.Next(fmt.Errorf("audit public key %s: %w", path, err),
			"pass the audit-signing.pub from the broker's state folder (or what `keybroker audit-key --dir DIR` prints)")
	}
	return pub, nil
}

// pinAuditKey records pub as broker name's audit key in the list at path.
func pinAuditKey(path, name string, pub []byte) error {
	brokers, err := opclient.LoadBrokers(path)
	if err != nil {
		return err
	}
	found := false
	for i, b := range brokers {
		if b.Name != name {
			continue
		}
		found = true
		if len(b.AuditKey) > 0 && !bytes.Equal(b.AuditKey, pub) {
			return fmt.Errorf("%s already pins another audit key for broker %s", path, name)
		}
		brokers[i].AuditKey = pub
	}
	if !found {
		return cli.Next(fmt.Errorf("%s lists no broker %s", path, name), "run `embassyctl brokers add %s https://HOST:PORT --audit-key FILE`", name)
	}
	return writeBrokers(path, brokers)
}

// writeBrokers writes the broker list atomically.
func writeBrokers(path string, brokers []opclient.Broker) error {
	data, err := json.MarshalIndent(brokers, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(data, '\n'), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// addBroker appends br to the broker list at path, creating it, and
// returns how many brokers the list holds.
func addBroker(path string, br opclient.Broker) (int, error) {
	if err := checkNameURL(br); err != nil {
		return 0, err
	}
	brokers, err := opclient.LoadBrokers(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return 0, err
	}
	for _, b := range brokers {
		if b.Name == br.Name {
			return 0, fmt.Errorf("%s already lists broker %s at %s", path, b.Name, b.URL)
		}
	}
	brokers = append(brokers, br)
	if err := writeBrokers(path, brokers); err != nil {
		return 0, err
	}
	return len(brokers), nil
}

// checkNameURL refuses, as a usage error, an entry without a name or an
// https:// URL.
func checkNameURL(br opclient.Broker) error {
	if br.Name == "" || !strings.HasPrefix(br.URL, "https://") {
		return &cli.UsageError{Msg: fmt.Sprintf("broker %q needs a name and an https:// URL, got %q", br.Name, br.URL)}
	}
	return nil
}

// majority is the default threshold for n brokers when --threshold is not
// given: more than half of them.
func majority(n int) int { return n/2 + 1 }

// verifier is how a command that meets an appliance believes its key: k
// brokers (--threshold, default a majority of the list), each through the
// CA of its own list entry.
func (c *conn) verifier(command string, threshold int) (identity.Verifier, error) {
	if c.authorities == nil {
		return identity.Verifier{}, cli.Next(fmt.Errorf("%s needs each broker's own CA to know the appliance", command),
			"name it in every broker list entry with `embassyctl brokers add NAME URL --ca FILE`")
	}
	k := threshold
	if k == 0 {
		k = majority(len(c.authorities))
	}
	if k < 1 || k > len(c.authorities) {
		return identity.Verifier{}, &cli.UsageError{Msg: fmt.Sprintf("--threshold %d: want 1 to %d (the brokers in the list)", k, len(c.authorities))}
	}
	return identity.Verifier{Brokers: c.authorities, Threshold: k}, nil
}

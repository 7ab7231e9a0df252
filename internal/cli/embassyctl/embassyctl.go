// Package embassyctl is the command tree of embassyctl, the home-state
// operator's CLI for the key brokers: every change (enroll, approve an
// image or disks, endpoints, floor, revoke) goes to every broker in the
// broker list, reads (status, audit) come from each, and attest checks an
// appliance directly.
package embassyctl

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/internal/cli"
	"github.com/dataembassy/embassy/operator/opclient"
	"github.com/dataembassy/embassy/protocol/identity"
)

// options are the global flags, shared by every subcommand.
type options struct {
	brokersPath, certPath, keyPath, caPath string
	asJSON                                 bool
	timeout                                time.Duration
}

// NewRootCmd builds the embassyctl command tree. Its defaults point into the
// local-default cache ($EMBASSY_CACHE, else .cache).
func NewRootCmd() *cobra.Command {
	cache := cli.CacheDir()
	pkiDir := filepath.Join(cache, "pki")
	o := &options{}
	root := cli.Group(&cobra.Command{
		Use:   "embassyctl",
		Short: "The home-state operator's CLI for the key brokers",
		Long: `embassyctl drives the home state's key brokers over their operator API
(mutual TLS). You are a custodian: each broker trusts only its own
custodian CA, so you hold one client certificate per broker, and the broker
list names, per broker, its URL, the CA that verifies it and your
certificate and key for it. Every change is sent to every broker in the
list, since each broker decides on its own (an approval counts where k
brokers' custodians gave it); status and audit read each broker; attest
checks an appliance's attestation directly.

An appliance becomes usable once the operators enroll it, approve the image
it runs and approve its blank disks.`,
		Example: `  embassyctl brokers add broker-a https://broker-a.example:8441 \
      --ca broker-ca.pem --cert alice@broker-a.pem --key alice@broker-a.key
  embassyctl enroll 3f9c...e1
  embassyctl approve-image out
  embassyctl approve-disk --count 2 3f9c...e1
  embassyctl status`,
	})
	f := root.PersistentFlags()
	f.StringVar(&o.brokersPath, "brokers", filepath.Join(cache, "brokers", "operator.json"), "JSON list of the brokers' operator endpoints (see 'embassyctl brokers add')")
	f.StringVar(&o.certPath, "cert", filepath.Join(pkiDir, "operator.pem"), "client certificate for the brokers whose list entry names none (a list from before custodians)")
	f.StringVar(&o.keyPath, "key", filepath.Join(pkiDir, "operator.key"), "key of --cert")
	f.StringVar(&o.caPath, "ca", filepath.Join(pkiDir, "broker-ca.pem"), "broker CA bundle for the brokers whose list entry names none")
	f.BoolVar(&o.asJSON, "json", false, "machine-readable output")
	f.DurationVar(&o.timeout, "timeout", time.Minute, "time limit for the whole command")
	root.MarkPersistentFlagFilename("brokers", "json")
	root.MarkPersistentFlagFilename("cert", "pem")
	root.MarkPersistentFlagFilename("key", "key", "pem")
	root.MarkPersistentFlagFilename("ca", "pem")

	root.AddGroup(&cobra.Group{ID: "change", Title: "Changes (sent to every broker):"},
		&cobra.Group{ID: "read", Title: "Reads and checks:"},
		&cobra.Group{ID: "setup", Title: "Set-up:"})
	for _, c := range changeCmds(o) {
		c.GroupID = "change"
		root.AddCommand(c)
	}
	for _, c := range []*cobra.Command{newAttestCmd(o), newStatusCmd(o), newAuditCmd(o)} {
		c.GroupID = "read"
		root.AddCommand(c)
	}
	b := newBrokersCmd(o)
	b.GroupID = "setup"
	root.AddCommand(b)
	root.SetHelpCommandGroupID("setup")
	root.SetCompletionCommandGroupID("setup")
	return cli.WithCompletion(root)
}

// conn is what a command that talks to the brokers gets from the flags.
type conn struct {
	client *opclient.Client
	// authorities are the brokers' own CAs, one per broker (nil when a
	// list entry names none: one bundle for all cannot say which broker
	// vouched).
	authorities []identity.Authority
	out         io.Writer
	asJSON      bool
}

// connect loads the broker list and each broker's credential: the client
// certificate and CA bundle its entry names, else (a list from before
// custodians) the --cert/--key and --ca flags. Each missing piece says
// where it comes from.
func (o *options) connect(cmd *cobra.Command) (*conn, error) {
	brokers, err := opclient.LoadBrokers(o.brokersPath)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, cli.Next(fmt.Errorf("no broker list: %w", err),
			"run `embassyctl brokers add NAME https://HOST:PORT --ca FILE --cert FILE --key FILE` once per broker (it writes %s), or pass --brokers FILE", o.brokersPath)
	}
	if err != nil {
		return nil, cli.Next(err, "fix the list, or write it again with `embassyctl brokers add`")
	}
	var fallback opclient.Credential
	var caFiles []string
	needCert, needCA := false, false
	for _, b := range brokers {
		needCert = needCert || !b.HasCert()
		needCA = needCA || b.CA == ""
		if b.CA != "" {
			caFiles = append(caFiles, b.CA)
		}
	}
	if needCert {
		if fallback.Cert, err = tls.LoadX509KeyPair(o.certPath, o.keyPath); err != nil {
			return nil, cli.Next(fmt.Errorf("operator certificate: %w", err),
				"give each broker its custodian credential with `embassyctl brokers add NAME URL --cert FILE --key FILE`, or pass --cert and --key (`make demo` creates local-default ones)")
		}
	}
	if needCA {
		if fallback.Roots, err = pki.LoadPool(o.caPath); err != nil {
			return nil, cli.Next(fmt.Errorf("broker CA: %w", err),
				"name each broker's own CA with `embassyctl brokers add --ca` (the local default is .cache/pki/<broker>-ca.pem), or pass --ca with a bundle of them")
		}
		caFiles = append(caFiles, o.caPath)
	}
	creds := make([]opclient.Credential, len(brokers))
	for i, b := range brokers {
		if creds[i], err = b.Credential(fallback); err != nil {
			return nil, cli.Next(err, "fix the files %s names for broker %s, or add it again with `embassyctl brokers add`", o.brokersPath, b.Name)
		}
	}
	client, err := opclient.NewPerBroker(brokers, creds)
	if err != nil {
		return nil, err
	}
	// attest believes an appliance's key only where k brokers, each
	// through its own CA, vouch for it.
	var auths []identity.Authority
	for i, b := range brokers {
		if b.CA == "" {
			auths = nil
			break
		}
		auths = append(auths, identity.Authority{Broker: b.Name, Roots: creds[i].Roots})
	}
	return &conn{client: client, authorities: auths, out: cmd.OutOrStdout(), asJSON: o.asJSON}, nil
}

// brokerCmd is a subcommand that talks to the brokers.
func (o *options) brokerCmd(cmd *cobra.Command, run func(context.Context, *conn, []string) error) *cobra.Command {
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		c, err := o.connect(cmd)
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(cmd.Context(), o.timeout)
		defer cancel()
		return run(ctx, c, args)
	}
	return cmd
}

// printChange prints the per-broker outcomes of a change and passes err on.
func (c *conn) printChange(action string, outs []opclient.Outcome, err error) error {
	if c.asJSON {
		opclient.PrintJSON(c.out, outs)
	} else {
		opclient.PrintOutcomes(c.out, action, outs)
	}
	return err
}

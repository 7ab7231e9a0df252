package keybroker

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/internal/cli"
)

// Files of a broker's custodians in its state folder.
const (
	// CustodianCAFile is the broker's own custodian CA certificate: serve
	// admits to the operator API only client certificates it issued.
	CustodianCAFile = "custodian-ca.pem"
	// CustodianCAKeyFile is its key: whoever holds it can make custodians
	// of this broker. Keep it offline once the custodians are issued.
	CustodianCAKeyFile = "custodian-ca.key"
	// CustodiansDir is where custodian add writes credentials by default.
	CustodiansDir = "custodians"
	// RevokedCustodiansFile lists the SHA-256 fingerprints (hex, one a
	// line) of custodian certificates serve refuses.
	RevokedCustodiansFile = "revoked-custodians"
)

const custodianCAValidity = 10 * 365 * 24 * time.Hour

var custodianName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$`)

// ensureCustodianCA loads the folder's custodian CA, creating it (named
// after the broker) when absent.
func ensureCustodianCA(dir, brokerName string) (*pki.Issuer, bool, error) {
	certPath, keyPath := filepath.Join(dir, CustodianCAFile), filepath.Join(dir, CustodianCAKeyFile)
	if _, err := os.Stat(certPath); err == nil {
		ca, err := pki.LoadIssuer(certPath, keyPath)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, false, cli.Next(fmt.Errorf("custodian CA key: %w", err),
				"bring %s back from where it is kept offline to issue a custodian", keyPath)
		}
		return ca, false, err
	}
	ca, err := pki.NewRootCA(brokerName+" custodian CA", custodianCAValidity)
	if err != nil {
		return nil, false, err
	}
	if err := pki.WritePEM(certPath, ca.Cert, keyPath, ca.Key); err != nil {
		return nil, false, err
	}
	return ca, true, nil
}

// issueCustodian writes NAME.pem and NAME.key, a client certificate from
// ca, into out and returns the certificate's path and fingerprint.
func issueCustodian(ca *pki.Issuer, name, out string, validity time.Duration) (string, string, error) {
	if !custodianName.MatchString(name) {
		return "", "", &cli.UsageError{Msg: fmt.Sprintf("custodian name %q: use letters, digits and . _ @ - (at most 64)", name)}
	}
	if err := os.MkdirAll(out, 0o700); err != nil {
		return "", "", err
	}
	certPath, keyPath := filepath.Join(out, name+".pem"), filepath.Join(out, name+".key")
	if _, err := os.Stat(certPath); err == nil {
		return "", "", cli.Next(fmt.Errorf("%s already exists", certPath), "pick another --name, or --out folder")
	}
	key, err := pki.NewKey()
	if err != nil {
		return "", "", err
	}
	leaf, err := ca.Leaf(name, nil, &key.PublicKey, validity)
	if err != nil {
		return "", "", err
	}
	if err := pki.WritePEM(certPath, leaf, keyPath, key); err != nil {
		return "", "", err
	}
	sum := sha256.Sum256(leaf.Raw)
	return certPath, hex.EncodeToString(sum[:]), nil
}

// printCustodian tells the broker admin what to hand the custodian.
func printCustodian(out io.Writer, broker, name, certPath, fp string) {
	keyPath := strings.TrimSuffix(certPath, ".pem") + ".key"
	fmt.Fprintf(out, "custodian %s of broker %s: certificate %s (sha256 %s), key %s\n", name, broker, certPath, fp, keyPath)
	fmt.Fprintf(out, "hand both to %s only (then delete the key here); they add this broker with `embassyctl brokers add %s https://HOST:PORT --ca BROKER-CA --cert %s.pem --key %s.key`\n",
		name, broker, name, name)
}

// loadRevokedCustodians reads the folder's revoked custodian fingerprints.
func loadRevokedCustodians(dir string) (map[string]bool, error) {
	f, err := os.Open(filepath.Join(dir, RevokedCustodiansFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]bool{}
	sc := bufio.NewScanner(io.LimitReader(f, 1<<20))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fp, _, _ := strings.Cut(line, " ")
		if b, err := hex.DecodeString(fp); err != nil || len(b) != sha256.Size {
			return nil, fmt.Errorf("%s line %d: %q is not a SHA-256 fingerprint", f.Name(), n, fp)
		}
		out[strings.ToLower(fp)] = true
	}
	return out, sc.Err()
}

// revocationSetter is what watchRevokedCustodians updates: the serving
// broker.
type revocationSetter interface {
	SetRevokedCustodians(fingerprints map[string]bool, readErr error)
}

// watchRevokedCustodians re-reads the folder's revoked-custodians file
// whenever its size or modification time changes (checked every period)
// until ctx ends, and hands the serving broker the new list, or the read
// error (the broker then admits no custodian until the file reads again).
func watchRevokedCustodians(ctx context.Context, dir string, b revocationSetter, log *slog.Logger, period time.Duration) {
	path := filepath.Join(dir, RevokedCustodiansFile)
	stamp := func() string {
		st, err := os.Stat(path)
		if err != nil {
			return err.Error()
		}
		return fmt.Sprint(st.Size(), st.ModTime().UnixNano())
	}
	last := stamp()
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := stamp()
		if now == last {
			continue
		}
		last = now
		revoked, err := loadRevokedCustodians(dir)
		b.SetRevokedCustodians(revoked, err)
		if err != nil {
			log.Error("custodian revocation list unreadable: no custodian is admitted until it reads again", "file", path, "err", err.Error())
			continue
		}
		log.Info("custodian revocation list reloaded", "file", path, "revoked", len(revoked))
	}
}

func newCustodianCmd() *cobra.Command {
	c := cli.Group(&cobra.Command{
		Use:   "custodian",
		Short: "Issue or revoke this broker's custodians (the only people its operator API admits)",
		Long: `A broker trusts only its own custodians: client certificates issued by the
custodian CA in its state folder (custodian-ca.pem). A custodian of another
broker, whose certificate that broker's CA issued, is refused at the TLS
handshake. So an approval counts at the brokers whose own custodians gave
it, and an appliance gets its disk keys only where k brokers did.`,
		Example: `  keybroker custodian add --dir /var/lib/keybroker --name alice
  keybroker custodian revoke --dir /var/lib/keybroker --cert custodians/alice.pem`,
	})
	var dir, name, out string
	var validity time.Duration
	add := &cobra.Command{
		Use:   "add --dir DIR --name NAME [--out FOLDER]",
		Short: "Issue a custodian certificate and key from this broker's custodian CA",
		Long: `add issues NAME.pem and NAME.key (a client certificate for the operator
API, common name NAME) from the custodian CA in the broker's state folder,
creating that CA (custodian-ca.pem, custodian-ca.key) in a folder made
before custodians. Hand the pair to the custodian; they add the broker with
'embassyctl brokers add NAME URL --ca FILE --cert NAME.pem --key NAME.key'.
A running broker admits the new custodian at once (restart it if the CA was
just created).`,
		Example: `  keybroker custodian add --dir /var/lib/keybroker --name alice
  keybroker custodian add --dir /var/lib/keybroker --name bob --out /media/usb --valid 8760h`,
		Args: cli.ExactArgs(0),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !initialised(dir) {
				return cli.Next(fmt.Errorf("no broker state in %s", dir),
					"run `keybroker init --dir %s --name NAME` first", dir)
			}
			broker, err := brokerName(dir)
			if err != nil {
				return err
			}
			ca, created, err := ensureCustodianCA(dir, broker)
			if err != nil {
				return err
			}
			if created {
				fmt.Fprintf(cmd.OutOrStdout(), "custodian CA created in %s; restart the broker (serve uses it by default)\n", filepath.Join(dir, CustodianCAFile))
			}
			if out == "" {
				out = filepath.Join(dir, CustodiansDir)
			}
			certPath, fp, err := issueCustodian(ca, name, out, validity)
			if err != nil {
				return err
			}
			printCustodian(cmd.OutOrStdout(), broker, name, certPath, fp)
			return nil
		},
	}
	add.Flags().StringVar(&dir, "dir", "", "broker state folder (from keybroker init)")
	add.Flags().StringVar(&name, "name", "", "custodian name (the certificate's common name, recorded in every audit entry they cause)")
	add.Flags().StringVar(&out, "out", "", "folder to write NAME.pem and NAME.key to (default DIR/custodians)")
	add.Flags().DurationVar(&validity, "valid", 2*365*24*time.Hour, "how long the certificate is valid")
	add.MarkFlagRequired("dir")
	add.MarkFlagRequired("name")
	add.MarkFlagDirname("dir")
	add.MarkFlagDirname("out")

	var rdir, certFile, fingerprint string
	revoke := &cobra.Command{
		Use:   "revoke --dir DIR (--cert FILE | --fingerprint SHA256)",
		Short: "Refuse a custodian certificate from now on",
		Long: `revoke appends the certificate's SHA-256 fingerprint to revoked-custodians
in the state folder. A serving broker notices the change within seconds
and refuses that certificate's next request (401); a broker started later
reads the file at start-up. If the file cannot be read or parsed, the
serving broker admits no custodian until it can (fail closed).
The fingerprint is the one 'custodian add' printed and every audit entry of
the custodian names.`,
		Example: `  keybroker custodian revoke --dir /var/lib/keybroker --cert custodians/alice.pem
  keybroker custodian revoke --dir /var/lib/keybroker --fingerprint 3b1f...9c`,
		Args: cli.ExactArgs(0),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if (certFile == "") == (fingerprint == "") {
				return &cli.UsageError{Msg: "give --cert FILE or --fingerprint SHA256 (one of them)"}
			}
			if certFile != "" {
				cert, err := pki.LoadCert(certFile)
				if err != nil {
					return err
				}
				sum := sha256.Sum256(cert.Raw)
				fingerprint = hex.EncodeToString(sum[:])
			}
			fingerprint = strings.ToLower(fingerprint)
			if b, err := hex.DecodeString(fingerprint); err != nil || len(b) != sha256.Size {
				return &cli.UsageError{Msg: fmt.Sprintf("--fingerprint %q is not a SHA-256 fingerprint (64 hex digits)", fingerprint)}
			}
			if _, err := loadRevokedCustodians(rdir); err != nil {
				return err
			}
			f, err := os.OpenFile(filepath.Join(rdir, RevokedCustodiansFile), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
			if err != nil {
				return err
			}
			if _, err := fmt.Fprintf(f, "%s revoked %s\n", fingerprint, time.Now().UTC().Format(time.RFC3339)); err != nil {
				f.Close()
				return err
			}
			if err := f.Close(); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "custodian sha256 %s revoked in %s; a serving broker refuses it within seconds\n",
				fingerprint, filepath.Join(rdir, RevokedCustodiansFile))
			return nil
		},
	}
	revoke.Flags().StringVar(&rdir, "dir", "", "broker state folder (from keybroker init)")
	revoke.Flags().StringVar(&certFile, "cert", "", "the custodian's certificate (PEM)")
	revoke.Flags().StringVar(&fingerprint, "fingerprint", "", "the custodian certificate's SHA-256 fingerprint (hex)")
	revoke.MarkFlagRequired("dir")
	revoke.MarkFlagDirname("dir")
	revoke.MarkFlagFilename("cert", "pem")
	c.AddCommand(add, revoke)
	return c
}

// brokerName is the broker's name: its TLS certificate's common name.
func brokerName(dir string) (string, error) {
	cert, err := pki.LoadCert(filepath.Join(dir, "tls.pem"))
	if err != nil {
		return "", fmt.Errorf("broker TLS certificate: %w", err)
	}
	return cert.Subject.CommonName, nil
}

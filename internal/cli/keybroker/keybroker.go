// Package keybroker is the command tree of the keybroker program: `init`
// creates a broker's state folder (TLS certificate and service CA under the
// broker's own root CA; its master key: a file, or with --pkcs11-module a
// non-extractable key generated in a PKCS#11 token, where the CA keys then
// go too; and its audit signing key), `serve` runs the broker's appliance and operator APIs from that
// folder, `audit-key` prints the audit public key the operators pin, and
// `custodian` issues and revokes the broker's own custodians (custodian.go):
// the only client certificates its operator API admits.
package keybroker

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/broker/hsm"
	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/broker/seal"
	"github.com/dataembassy/embassy/images/imagekey"
	"github.com/dataembassy/embassy/internal/cli"
)

// MasterKeyFile is the file in a broker's state folder whose presence marks
// the folder as initialised.
const MasterKeyFile = "master.key"

// NewRootCmd builds the keybroker command tree.
func NewRootCmd() *cobra.Command {
	root := cli.Group(&cobra.Command{
		Use:   "keybroker",
		Short: "A home-state key broker: attests appliances and releases their disk key shares",
		Long: `keybroker runs one of the home state's k-of-n key brokers. Appliances attest
to it with their TPM; it releases its share of their disk keys only to an
appliance the operators enrolled, running an image they approved.

Create a broker's state folder once with 'keybroker init', then run it with
'keybroker serve'. The operators drive it with embassyctl.`,
		Example: `  keybroker init --dir /var/lib/keybroker --name broker-a \
      --broker-ca-cert broker-ca.pem --broker-ca-key broker-ca.key --hosts broker-a.example,10.0.0.5
  keybroker serve --dir /var/lib/keybroker --name broker-a \
      --manufacturer-ca tpm-vendors.pem --image-pubkey image-signing.pub
  keybroker custodian add --dir /var/lib/keybroker --name bob`,
	})
	root.AddCommand(newInitCmd(), newServeCmd(), newAuditKeyCmd(), newCustodianCmd())
	return cli.WithCompletion(root)
}

type initOptions struct {
	dir, name, caCert, caKey, hosts string
	custodian                       string
	p11                             pkcs11Options
}

func newInitCmd() *cobra.Command {
	var o initOptions
	cmd := &cobra.Command{
		Use:   "init --dir DIR --name NAME [--broker-ca-cert FILE --broker-ca-key FILE]",
		Short: "Create a broker's state folder: its own root CA, TLS certificate, service CA, master key and audit signing key",
		Long: `init creates the broker's state folder: the broker's own root CA
(broker-ca.pem, and broker-ca.key unless its key goes into a token, see
below; no other broker shares it, and the image pins
it for this broker alone: 'mkimage build --broker-ca NAME=DIR/broker-ca.pem'),
a TLS certificate for the names and addresses in --hosts and a service CA,
both issued by that root, a fresh master key, a fresh audit signing key (ed25519) and the
broker's own custodian CA (custodian-ca.pem and .key): its operator API
admits only custodians that CA issued, never another broker's. With
--custodian NAME it issues the first custodian's certificate and key into
custodians/ (more with 'keybroker custodian add'). It refuses a folder
that is already initialised. --broker-ca-cert and --broker-ca-key adopt an
existing root CA for this broker instead of creating one (the local
default, whose image is built before its brokers).

The master key is a file (master.key) unless --pkcs11-module is given: then
it is generated inside the PKCS#11 token as a non-extractable AES-256 key
labelled --pkcs11-key-label, and never leaves it (master.pkcs11 names the
token and the keys, not the PIN). serve needs the same --pkcs11-* flags.
With a token the CA keys go there too, as non-extractable ECDSA P-256 key
pairs: the service CA's, labelled KEY-LABEL` + ServiceCAKeySuffix + ` (no service-ca.key
is written), and the root CA's when init creates the root, labelled
KEY-LABEL` + RootCAKeySuffix + ` (no broker-ca.key; an adopted root's key stays
where it is). An init that fails destroys the CA keys it generated.

The broker signs its audit head with the audit key; init writes the public
half to audit-signing.pub in the folder and prints it, for the operators to
pin with 'embassyctl brokers add NAME URL --audit-key audit-signing.pub'.`,
		Example: `  keybroker init --dir /var/lib/keybroker --name broker-a --hosts broker-a.example,10.0.0.5 --custodian alice
  keybroker init --dir /var/lib/keybroker --name broker-a \
      --pkcs11-module /usr/lib/softhsm/libsofthsm2.so --pkcs11-token-label broker-a \
      --pkcs11-pin-file /etc/keybroker/pin --pkcs11-key-label broker-a-master`,
		Args: cli.ExactArgs(0),
		RunE: func(cmd *cobra.Command, _ []string) error { return initBroker(cmd.OutOrStdout(), o) },
	}
	f := cmd.Flags()
	f.StringVar(&o.dir, "dir", "", "broker state folder to create")
	f.StringVar(&o.name, "name", "", "broker name (also its certificate's common name)")
	f.StringVar(&o.caCert, "broker-ca-cert", "", "adopt this root CA certificate (PEM) as the broker's own (default: create one)")
	f.StringVar(&o.caKey, "broker-ca-key", "", "key of --broker-ca-cert (PEM)")
	f.StringVar(&o.hosts, "hosts", "127.0.0.1", "comma-separated names and addresses the broker is reached at")
	f.StringVar(&o.custodian, "custodian", "", "issue the first custodian's certificate and key (custodians/NAME.pem, .key)")
	o.p11.addFlags(f, "generate")
	for _, n := range []string{"dir", "name"} {
		cmd.MarkFlagRequired(n)
	}
	cmd.MarkFlagDirname("dir")
	cmd.MarkFlagFilename("broker-ca-cert", "pem")
	cmd.MarkFlagFilename("broker-ca-key", "key", "pem")
	return cmd
}

// initialised reports whether dir holds a master key (file or token record).
func initialised(dir string) bool {
	for _, f := range []string{MasterKeyFile, MasterKeyPKCS11File} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			return true
		}
	}
	return false
}

func initBroker(out io.Writer, o initOptions) (err error) {
	if initialised(o.dir) {
		return cli.Next(fmt.Errorf("%s is already initialised", o.dir),
			"run `keybroker serve --dir %s ...`, or pass another --dir", o.dir)
	}
	var hcfg hsm.Config
	if o.p11.enabled() {
		var err error
		if hcfg, err = o.p11.config(); err != nil {
			return err
		}
		defer clear(hcfg.PIN)
	} else if err := o.p11.check(); err != nil {
		return err
	}
	if (o.caCert == "") != (o.caKey == "") {
		return &cli.UsageError{Msg: "--broker-ca-cert and --broker-ca-key go together: give both (adopt a root CA) or neither (create one)"}
	}
	ca, err := adoptedRootCA(o)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(o.dir, 0o700); err != nil {
		return err
	}
	// With a token, the CA keys init creates are generated in it; an init
	// that fails destroys them again (nothing else used them).
	var caKeys *tokenCAKeys
	if o.p11.enabled() {
		caKeys = &tokenCAKeys{cfg: hcfg}
		defer func() {
			caKeys.close()
			if err != nil {
				caKeys.rollback()
			}
		}()
	}
	created := ca == nil
	if ca, err = writeRootCA(o, ca, caKeys); err != nil {
		return err
	}
	svc, err := newServiceCA(o, ca, caKeys)
	if err != nil {
		return err
	}
	key, err := pki.NewKey()
	if err != nil {
		return err
	}
	leaf, err := ca.Leaf(o.name, strings.Split(o.hosts, ","), &key.PublicKey, 2*365*24*time.Hour)
	if err != nil {
		return err
	}
	if err := pki.WritePEM(filepath.Join(o.dir, "tls.pem"), leaf, filepath.Join(o.dir, "tls.key"), key); err != nil {
		return err
	}
	svcKeyPath := filepath.Join(o.dir, ServiceCAKeyFile)
	if caKeys != nil {
		svcKeyPath = "" // in the token
	}
	if err := pki.WritePEM(filepath.Join(o.dir, ServiceCAFile), svc.Cert, svcKeyPath, svc.Key); err != nil {
		return err
	}
	auditPub, err := audit.CreateSigningKey(o.dir)
	if err != nil {
		return err
	}
	if o.custodian != "" && !custodianName.MatchString(o.custodian) {
		return &cli.UsageError{Msg: fmt.Sprintf("--custodian %q: use letters, digits and . _ @ - (at most 64)", o.custodian)}
	}
	custCA, _, err := ensureCustodianCA(o.dir, o.name)
	if err != nil {
		return err
	}
	if o.custodian != "" {
		certPath, fp, err := issueCustodian(custCA, o.custodian, filepath.Join(o.dir, CustodiansDir), 2*365*24*time.Hour)
		if err != nil {
			return err
		}
		printCustodian(out, o.name, o.custodian, certPath, fp)
	}
	// The master key goes last: its presence marks the folder initialised.
	if o.p11.enabled() {
		if err := hsm.GenerateKey(hcfg); err != nil {
			return fmt.Errorf("master key: %w", err)
		}
		if err := writePKCS11Record(o.dir, o.p11, caKeys.rootLabel, caKeys.serviceLabel); err != nil {
			return err
		}
		fmt.Fprintf(out, "broker %s initialised in %s; master key %q generated in PKCS#11 token %q (not extractable)\n",
			o.name, o.dir, o.p11.keyLabel, o.p11.tokenLabel)
		fmt.Fprintf(out, "%s\n", caKeys.describe())
		printRootCA(out, o.name, o.dir, ca, created)
		return printAuditKey(out, o.dir, auditPub)
	}
	master := make([]byte, 32)
	if _, err := rand.Read(master); err != nil {
		return err
	}
	defer clear(master)
	hexKey := []byte(hex.EncodeToString(master) + "\n")
	defer clear(hexKey)
	if err := os.WriteFile(filepath.Join(o.dir, MasterKeyFile), hexKey, 0o600); err != nil {
		return err
	}
	fmt.Fprintf(out, "broker %s initialised in %s\n", o.name, o.dir)
	printRootCA(out, o.name, o.dir, ca, created)
	return printAuditKey(out, o.dir, auditPub)
}

// BrokerCAFile is the broker's own root CA certificate in its state folder
// (and BrokerCAKeyFile its key, when init created it without a token).
// ServiceCAFile is the service CA's certificate, and ServiceCAKeyFile its
// key when it is not in a token.
const (
	BrokerCAFile     = "broker-ca.pem"
	BrokerCAKeyFile  = "broker-ca.key"
	ServiceCAFile    = "service-ca.pem"
	ServiceCAKeyFile = "service-ca.key"
)

// adoptedRootCA loads the root CA of --broker-ca-cert/--broker-ca-key
// (nil without them).
func adoptedRootCA(o initOptions) (*pki.Issuer, error) {
	if o.caCert == "" {
		return nil, nil
	}
	ca, err := pki.LoadIssuer(o.caCert, o.caKey)
	if err != nil {
		return nil, cli.Next(fmt.Errorf("broker root CA: %w", err),
			"pass this broker's own root CA with --broker-ca-cert and --broker-ca-key, or neither to create one")
	}
	if !ca.Cert.IsCA {
		return nil, fmt.Errorf("%s is not a CA certificate", o.caCert)
	}
	return ca, nil
}

// writeRootCA writes the adopted root CA's certificate into the state
// folder or, with none adopted, creates the broker's own and writes its
// certificate there, and its key too unless keys puts it in the token.
func writeRootCA(o initOptions, adopted *pki.Issuer, keys *tokenCAKeys) (*pki.Issuer, error) {
	certPath := filepath.Join(o.dir, BrokerCAFile)
	if adopted != nil {
		return adopted, pki.WritePEM(certPath, adopted.Cert, "", nil)
	}
	const name, validity = " root CA", 10 * 365 * 24 * time.Hour
	if keys != nil {
		key, err := keys.generate(&keys.rootLabel, o.p11.keyLabel+RootCAKeySuffix)
		if err != nil {
			return nil, fmt.Errorf("root CA key: %w", err)
		}
		ca, err := pki.RootCA(o.name+name, validity, key)
		if err != nil {
			return nil, err
		}
		return ca, pki.WritePEM(certPath, ca.Cert, "", nil)
	}
	ca, err := pki.NewRootCA(o.name+name, validity)
	if err != nil {
		return nil, err
	}
	return ca, pki.WritePEM(certPath, ca.Cert, filepath.Join(o.dir, BrokerCAKeyFile), ca.Key)
}

// newServiceCA issues the broker's service CA under its root: for a fresh
// Ed25519 key, or for an ECDSA P-256 key generated in the token when keys
// is set.
func newServiceCA(o initOptions, root *pki.Issuer, keys *tokenCAKeys) (*pki.Issuer, error) {
	const name, validity = " service CA", 5 * 365 * 24 * time.Hour
	if keys == nil {
		return root.NewIntermediate(o.name+name, validity)
	}
	key, err := keys.generate(&keys.serviceLabel, o.p11.keyLabel+ServiceCAKeySuffix)
	if err != nil {
		return nil, fmt.Errorf("service CA key: %w", err)
	}
	return root.Intermediate(o.name+name, validity, key)
}

// printRootCA tells the operators which CA to pin for this broker: in the
// image, and in their broker list.
func printRootCA(out io.Writer, name, dir string, ca *pki.Issuer, created bool) {
	sum := sha256.Sum256(ca.Cert.Raw)
	how := "adopted"
	if created {
		how = "created"
	}
	path := filepath.Join(dir, BrokerCAFile)
	fmt.Fprintf(out, "root CA %s (%s, SHA-256 %x); pin it for this broker alone: `mkimage build --broker-ca %s=%s` and `embassyctl brokers add %s URL --ca %s`\n",
		path, how, sum, name, path, name, path)
}

// printAuditKey tells the operators which audit public key to pin.
func printAuditKey(out io.Writer, dir string, pub ed25519.PublicKey) error {
	pemPub, err := audit.EncodePublicKey(pub)
	if err != nil {
		return err
	}
	path := filepath.Join(dir, audit.SigningPubKeyFile)
	fmt.Fprintf(out, "audit signing public key (%s); pin it with `embassyctl brokers add NAME https://HOST:PORT --audit-key %s`:\n%s",
		path, path, pemPub)
	return nil
}

func newAuditKeyCmd() *cobra.Command {
	var dir string
	cmd := &cobra.Command{
		Use:   "audit-key --dir DIR",
		Short: "Print the broker's audit signing public key (creating the key in a folder made before audit keys)",
		Long: `audit-key prints the public half of the key the broker signs its audit head
with, for the operators to pin in their broker list. A state folder made by
an init that predates audit signing keys gets one now (the broker must be
restarted to use it).`,
		Example: `  keybroker audit-key --dir /var/lib/keybroker`,
		Args:    cli.ExactArgs(0),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !initialised(dir) {
				return cli.Next(fmt.Errorf("no broker state in %s: %w", dir, fs.ErrNotExist),
					"run `keybroker init --dir %s --name NAME` first", dir)
			}
			key, err := audit.LoadSigningKey(filepath.Join(dir, audit.SigningKeyFile))
			if errors.Is(err, fs.ErrNotExist) {
				pub, err := audit.CreateSigningKey(dir)
				if err != nil {
					return err
				}
				return printAuditKey(cmd.OutOrStdout(), dir, pub)
			}
			if err != nil {
				return err
			}
			return printAuditKey(cmd.OutOrStdout(), dir, key.Public().(ed25519.PublicKey))
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "broker state folder (from keybroker init)")
	cmd.MarkFlagRequired("dir")
	cmd.MarkFlagDirname("dir")
	return cmd
}

type serveOptions struct {
	dir, name, opCA, manuCA, imagePub string
	appAddr, opAddr                   string
	nonceTTL, certTTL, reattest       time.Duration
	p11                               pkcs11Options
}

func newServeCmd() *cobra.Command {
	var o serveOptions
	cmd := &cobra.Command{
		Use:   "serve --dir DIR --name NAME --manufacturer-ca FILE --image-pubkey FILE [--operator-ca FILE]",
		Short: "Run the broker's appliance API and operator API until interrupted",
		Long: `serve runs the broker from a state folder made by 'keybroker init': the
appliance API (attestation, share release; TLS) and the operator API
(enrollment, approvals, audit; mutual TLS with this broker's own
custodians: client certificates from --operator-ca, by default the
custodian CA in the state folder, minus those in revoked-custodians).
A refused client certificate is logged ("custodian credential refused").
It logs JSON lines to stderr and stops on SIGINT or SIGTERM.

A broker initialised with --pkcs11-module needs the same --pkcs11-* flags:
its shares are sealed and opened inside the token, and its service CA
signs every attested appliance's certificate inside the token (a folder
initialised before CA keys went into tokens still reads service-ca.key).
One initialised with a master key file warns at start-up.`,
		Example: `  keybroker serve --dir /var/lib/keybroker --name broker-a \
      --manufacturer-ca tpm-vendors.pem --image-pubkey image-signing.pub \
      --appliance-listen 0.0.0.0:7441 --operator-listen 10.0.0.5:8441`,
		Args: cli.ExactArgs(0),
		RunE: func(cmd *cobra.Command, _ []string) error { return serve(cmd.Context(), cmd.ErrOrStderr(), o) },
	}
	f := cmd.Flags()
	f.StringVar(&o.dir, "dir", "", "broker state folder (from keybroker init)")
	f.StringVar(&o.name, "name", "", "broker name")
	f.StringVar(&o.opCA, "operator-ca", "", "CA bundle of the custodians the operator API admits (PEM; default DIR/"+CustodianCAFile+")")
	f.StringVar(&o.manuCA, "manufacturer-ca", "", "TPM manufacturer CA bundle for EK certificates (PEM)")
	f.StringVar(&o.imagePub, "image-pubkey", "", "image-signing public key (PKIX PEM)")
	f.StringVar(&o.appAddr, "appliance-listen", "127.0.0.1:7441", "appliance API address")
	f.StringVar(&o.opAddr, "operator-listen", "127.0.0.1:8441", "operator API address")
	f.DurationVar(&o.nonceTTL, "nonce-ttl", time.Minute, "lifetime of an attestation nonce")
	f.DurationVar(&o.certTTL, "cert-ttl", time.Hour, "lifetime of an attested appliance certificate")
	f.DurationVar(&o.reattest, "reattest", 5*time.Minute, "how often appliances re-attest")
	o.p11.addFlags(f, "use")
	for _, n := range []string{"dir", "name", "manufacturer-ca", "image-pubkey"} {
		cmd.MarkFlagRequired(n)
	}
	cmd.MarkFlagDirname("dir")
	for _, n := range []string{"operator-ca", "manufacturer-ca", "image-pubkey"} {
		cmd.MarkFlagFilename(n, "pem", "pub")
	}
	return cmd
}

// loadAuditKey reads the audit signing key of an initialised state folder.
func loadAuditKey(dir string) (ed25519.PrivateKey, error) {
	key, err := audit.LoadSigningKey(filepath.Join(dir, audit.SigningKeyFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, cli.Next(fmt.Errorf("no audit signing key in %s: %w", dir, err),
			"run `keybroker audit-key --dir %s` (it creates one for a folder made before audit keys) and pin the key it prints with `embassyctl brokers add --audit-key`", dir)
	}
	return key, err
}

// masterKey is the broker's master key as loaded by loadState, with the
// service CA's key when it is in the same token.
type masterKey struct {
	sealer    broker.ShareSealer
	serviceCA crypto.Signer // nil: ServiceCAKeyFile
	close     func()
	token     *pkcs11Record // nil: a file
}

// loadState opens the master key (a file, or the token p names) and reads
// the service CA and TLS certificate of an initialised state folder.
func loadState(dir string, p pkcs11Options) (mk masterKey, svc *pki.Issuer, tlsCert tls.Certificate, err error) {
	if mk, err = loadMasterKey(dir, p); err != nil {
		return mk, nil, tlsCert, err
	}
	defer func() {
		if err != nil {
			mk.close()
		}
	}()
	if svc, err = loadServiceCA(dir, mk.serviceCA); err != nil {
		return mk, nil, tlsCert, err
	}
	tlsCert, err = tls.LoadX509KeyPair(filepath.Join(dir, "tls.pem"), filepath.Join(dir, "tls.key"))
	if err != nil {
		return mk, nil, tlsCert, fmt.Errorf("broker TLS certificate: %w", err)
	}
	return mk, svc, tlsCert, nil
}

// loadServiceCA reads the service CA's certificate with its key: key (in
// the token) when given, which must be the certificate's, else
// ServiceCAKeyFile.
func loadServiceCA(dir string, key crypto.Signer) (*pki.Issuer, error) {
	certPath := filepath.Join(dir, ServiceCAFile)
	if key == nil {
		return pki.LoadIssuer(certPath, filepath.Join(dir, ServiceCAKeyFile))
	}
	cert, err := pki.LoadCert(certPath)
	if err != nil {
		return nil, fmt.Errorf("service CA: %w", err)
	}
	if pub, ok := cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(key.Public()) {
		return nil, fmt.Errorf("service CA: %s is not the certificate of the token's service CA key", certPath)
	}
	return &pki.Issuer{Cert: cert, Key: key}, nil
}

func loadMasterKey(dir string, p pkcs11Options) (masterKey, error) {
	if err := p.check(); err != nil {
		return masterKey{}, err
	}
	rec, err := readPKCS11Record(dir)
	if err != nil {
		return masterKey{}, err
	}
	if rec != nil {
		if !p.enabled() {
			return masterKey{}, cli.Next(fmt.Errorf("%s keeps its master key in PKCS#11 token %q", dir, rec.TokenLabel),
				"pass --pkcs11-module %s --pkcs11-token-label %s --pkcs11-pin-file FILE --pkcs11-key-label %s",
				rec.Module, rec.TokenLabel, rec.KeyLabel)
		}
		if err := rec.matches(p); err != nil {
			return masterKey{}, err
		}
		cfg, err := p.config()
		if err != nil {
			return masterKey{}, err
		}
		defer clear(cfg.PIN)
		s, err := hsm.Open(cfg)
		if err != nil {
			return masterKey{}, fmt.Errorf("master key: %w", err)
		}
		mk := masterKey{sealer: s, close: func() { s.Close() }, token: rec}
		if rec.ServiceCAKeyLabel == "" {
			return mk, nil
		}
		cfg.KeyLabel = rec.ServiceCAKeyLabel
		ca, err := hsm.OpenSigner(cfg)
		if err != nil {
			s.Close()
			return masterKey{}, fmt.Errorf("service CA key: %w", err)
		}
		mk.serviceCA, mk.close = ca, func() { ca.Close(); s.Close() }
		return mk, nil
	}
	hexKey, err := os.ReadFile(filepath.Join(dir, MasterKeyFile))
	if errors.Is(err, fs.ErrNotExist) {
		return masterKey{}, cli.Next(fmt.Errorf("no broker state in %s: %w", dir, err),
			"run `keybroker init --dir %s --name NAME` first", dir)
	}
	if err != nil {
		return masterKey{}, fmt.Errorf("master key: %w", err)
	}
	defer clear(hexKey)
	if p.enabled() {
		return masterKey{}, cli.Next(fmt.Errorf("%s keeps its master key in a file (%s), not in a PKCS#11 token", dir, MasterKeyFile),
			"drop the --pkcs11-* flags; moving the shares into a token needs a new broker (keybroker init --pkcs11-module ...)")
	}
	master, err := hex.DecodeString(strings.TrimSpace(string(hexKey)))
	defer clear(master)
	if err != nil || len(master) != 32 {
		return masterKey{}, errors.New("master key must be 64 hex digits")
	}
	fk, err := seal.NewFileKey(master)
	if err != nil {
		return masterKey{}, err
	}
	return masterKey{sealer: fk, close: func() {}}, nil
}

func serve(ctx context.Context, stderr io.Writer, o serveOptions) error {
	mk, svc, tlsCert, err := loadState(o.dir, o.p11)
	if err != nil {
		return err
	}
	defer mk.close()
	auditKey, err := loadAuditKey(o.dir)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewJSONHandler(stderr, nil)).With("broker", o.name)
	if mk.token == nil {
		log.Warn(MsgFileMasterKey, "file", filepath.Join(o.dir, MasterKeyFile))
	} else {
		log.Info("master key in a PKCS#11 token", "module", o.p11.module, "token", mk.token.TokenLabel, "key", mk.token.KeyLabel)
		if mk.serviceCA != nil {
			log.Info("service CA key in the PKCS#11 token", "token", mk.token.TokenLabel, "key", mk.token.ServiceCAKeyLabel)
		}
	}
	opCA := o.opCA
	if opCA == "" {
		opCA = filepath.Join(o.dir, CustodianCAFile)
		if _, err := os.Stat(opCA); errors.Is(err, fs.ErrNotExist) {
			return cli.Next(fmt.Errorf("no custodian CA in %s: %w", o.dir, err),
				"run `keybroker custodian add --dir %s --name NAME` (it creates the broker's custodian CA and a first custodian), or pass --operator-ca FILE", o.dir)
		}
	}
	ops, err := pki.LoadPool(opCA)
	if err != nil {
		return err
	}
	revoked, err := loadRevokedCustodians(o.dir)
	if err != nil {
		return err
	}
	log.Info("operator API admits this broker's custodians", "custodian_ca", opCA, "revoked", len(revoked))
	manu, err := pki.LoadPool(o.manuCA)
	if err != nil {
		return err
	}
	img, err := imagekey.LoadPublic(o.imagePub)
	if err != nil {
		return err
	}
	b, err := broker.New(broker.Config{Name: o.name, Dir: o.dir, Sealer: mk.sealer, ManufacturerCAs: manu, ImageKey: img,
		ServiceCA: svc, NonceTTL: o.nonceTTL, CertTTL: o.certTTL, ReattestAfter: o.reattest, AuditKey: auditKey,
		Custodians: ops, RevokedCustodians: revoked, Log: log})
	if err != nil {
		return err
	}
	defer b.Close()
	appSrv := &http.Server{Addr: o.appAddr, Handler: b.ApplianceHandler(), TLSConfig: b.ApplianceTLSConfig(tlsCert),
		ReadHeaderTimeout: 10 * time.Second, ReadTimeout: time.Minute}
	opSrv := &http.Server{Addr: o.opAddr, Handler: b.OperatorHandler(), TLSConfig: b.CustodianTLSConfig(tlsCert),
		ReadHeaderTimeout: 10 * time.Second, ReadTimeout: time.Minute}
	errc := make(chan error, 2)
	go func() { errc <- appSrv.ListenAndServeTLS("", "") }()
	go func() { errc <- opSrv.ListenAndServeTLS("", "") }()
	log.Info("broker serving", "appliance_api", o.appAddr, "operator_api", o.opAddr)
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	// `keybroker custodian revoke` takes effect while serving.
	go watchRevokedCustodians(ctx, o.dir, b, log, 2*time.Second)
	select {
	case err = <-errc:
	case <-ctx.Done():
	}
	shut, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	appSrv.Shutdown(shut)
	opSrv.Shutdown(shut)
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// Command embassyctl is the home-state operator's CLI for the key brokers:
//
//	embassyctl [global flags] enroll <appliance-id>
//	embassyctl [global flags] approve-image <image folder>
//	embassyctl [global flags] set-endpoints <appliance-id> <ip:port>[,<ip:port>...]
//	embassyctl [global flags] set-floor <appliance-id> <version>
//	embassyctl [global flags] approve-disk [-count N] <appliance-id>
//	embassyctl [global flags] revoke <appliance-id>
//	embassyctl [global flags] attest <appliance host:port>
//	embassyctl [global flags] status
//	embassyctl [global flags] audit show|verify
//	embassyctl audit verify -file audit.log [-head SEQ:HASH]
//
// Global flags: -brokers FILE -cert FILE -key FILE -ca FILE -json.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/dataembassy/embassy/broker/audit"
	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/images/manifest"
	"github.com/dataembassy/embassy/operator/opclient"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "embassyctl:", err)
		os.Exit(1)
	}
}

func cacheDir() string {
	if c := os.Getenv("EMBASSY_CACHE"); c != "" {
		return c
	}
	return ".cache"
}

func run(args []string) error {
	fs := flag.NewFlagSet("embassyctl", flag.ContinueOnError)
	pkiDir := filepath.Join(cacheDir(), "pki")
	brokersPath := fs.String("brokers", filepath.Join(cacheDir(), "brokers", "operator.json"), "JSON list of brokers' operator endpoints")
	certPath := fs.String("cert", filepath.Join(pkiDir, "operator.pem"), "operator certificate (home-state operator CA)")
	keyPath := fs.String("key", filepath.Join(pkiDir, "operator.key"), "operator key")
	caPath := fs.String("ca", filepath.Join(pkiDir, "broker-ca.pem"), "broker CA bundle")
	asJSON := fs.Bool("json", false, "machine-readable output")
	if err := fs.Parse(args); err != nil {
		return err
	}
	rest := fs.Args()
	if len(rest) == 0 {
		return errors.New("missing command: enroll, approve-image, set-endpoints, set-floor, approve-disk, revoke, attest, status, audit")
	}
	if rest[0] == "audit" && len(rest) > 1 && rest[1] == "verify" && hasFlag(rest[2:], "file") {
		return verifyFile(rest[2:], *asJSON)
	}
	brokers, err := opclient.LoadBrokers(*brokersPath)
	if err != nil {
		return err
	}
	cert, err := tls.LoadX509KeyPair(*certPath, *keyPath)
	if err != nil {
		return fmt.Errorf("operator certificate: %w", err)
	}
	roots, err := pki.LoadPool(*caPath)
	if err != nil {
		return err
	}
	c := opclient.New(brokers, cert, roots)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out := os.Stdout
	change := func(action string, outs []opclient.Outcome, err error) error {
		if *asJSON {
			opclient.PrintJSON(out, outs)
		} else {
			opclient.PrintOutcomes(out, action, outs)
		}
		return err
	}
	need := func(n int, usage string) error {
		if len(rest) != n+1 {
			return fmt.Errorf("usage: embassyctl %s", usage)
		}
		return nil
	}
	switch rest[0] {
	case "enroll":
		if err := need(1, "enroll <appliance-id>"); err != nil {
			return err
		}
		outs, err := c.ApproveEnrollment(ctx, rest[1])
		return change("enroll "+rest[1], outs, err)
	case "approve-image":
		if err := need(1, "approve-image <image folder with manifest.json and manifest.sig>"); err != nil {
			return err
		}
		m, err := os.ReadFile(filepath.Join(rest[1], manifest.File))
		if err != nil {
			return err
		}
		s, err := os.ReadFile(filepath.Join(rest[1], manifest.SignatureFile))
		if err != nil {
			return err
		}
		outs, err := c.ApproveImage(ctx, m, s)
		return change("approve-image", outs, err)
	case "set-endpoints":
		if err := need(2, "set-endpoints <appliance-id> <ip:port>[,<ip:port>...]"); err != nil {
			return err
		}
		outs, err := c.SetEndpoints(ctx, rest[1], strings.Split(rest[2], ","))
		return change("set-endpoints", outs, err)
	case "set-floor":
		if err := need(2, "set-floor <appliance-id> <version>"); err != nil {
			return err
		}
		v, err := strconv.ParseUint(rest[2], 10, 64)
		if err != nil || v == 0 {
			return fmt.Errorf("version %q is not a positive integer", rest[2])
		}
		outs, err := c.SetFloor(ctx, rest[1], v)
		return change("set-floor", outs, err)
	case "approve-disk":
		sub := flag.NewFlagSet("approve-disk", flag.ContinueOnError)
		count := sub.Int("count", 1, "number of new disks")
		if err := sub.Parse(rest[1:]); err != nil {
			return err
		}
		if sub.NArg() != 1 {
			return errors.New("usage: embassyctl approve-disk [-count N] <appliance-id>")
		}
		outs, err := c.ApproveDisks(ctx, sub.Arg(0), *count)
		return change("approve-disk", outs, err)
	case "revoke":
		if err := need(1, "revoke <appliance-id>"); err != nil {
			return err
		}
		outs, err := c.Revoke(ctx, rest[1])
		return change("revoke", outs, err)
	case "attest":
		if err := need(1, "attest <appliance host:port>"); err != nil {
			return err
		}
		v, err := c.AttestAppliance(ctx, rest[1], roots)
		if err != nil {
			return err
		}
		if *asJSON {
			opclient.PrintJSON(out, v)
		} else {
			opclient.PrintVerdict(out, v)
		}
		if !v.Pass {
			return fmt.Errorf("appliance %s failed the attestation check", v.ApplianceID)
		}
		return nil
	case "status":
		st := c.Status(ctx)
		if *asJSON {
			return opclient.PrintJSON(out, st)
		}
		opclient.PrintStatus(out, st)
		return nil
	case "audit":
		if len(rest) != 2 || (rest[1] != "show" && rest[1] != "verify") {
			return errors.New("usage: embassyctl audit show|verify")
		}
		logs := c.Audit(ctx)
		if *asJSON {
			opclient.PrintJSON(out, logs)
		} else {
			opclient.PrintAudit(out, logs, rest[1] == "show")
		}
		for _, l := range logs {
			if !l.Verified {
				return fmt.Errorf("audit log of %s does not verify", l.Broker)
			}
		}
		return nil
	}
	return fmt.Errorf("unknown command %q", rest[0])
}

func hasFlag(args []string, name string) bool {
	for _, a := range args {
		if strings.TrimLeft(a, "-") == name || strings.HasPrefix(strings.TrimLeft(a, "-"), name+"=") {
			return true
		}
	}
	return false
}

// verifyFile checks an exported audit log file offline.
func verifyFile(args []string, asJSON bool) error {
	fs := flag.NewFlagSet("audit verify", flag.ContinueOnError)
	file := fs.String("file", "", "audit log file (JSON lines)")
	headArg := fs.String("head", "", "expected head as SEQ:HASH (from the broker or an earlier check)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	f, err := os.Open(*file)
	if err != nil {
		return err
	}
	defer f.Close()
	entries, err := audit.Read(f)
	if err != nil {
		return err
	}
	var want *audit.Head
	if *headArg != "" {
		seq, hash, ok := strings.Cut(*headArg, ":")
		n, perr := strconv.ParseUint(seq, 10, 64)
		if !ok || perr != nil || len(hash) != 64 {
			return fmt.Errorf("-head %q must be SEQ:HASH", *headArg)
		}
		want = &audit.Head{Seq: n, Hash: hash}
	}
	head, err := audit.Verify(entries, want)
	if asJSON {
		opclient.PrintJSON(os.Stdout, map[string]any{"entries": len(entries), "head": head, "verified": err == nil})
	} else if err == nil {
		fmt.Printf("%s: %d entries, head %d %s: chain verified\n", *file, len(entries), head.Seq, head.Hash)
	}
	return err
}

// Command keybroker runs one home-state key broker.
//
//	keybroker init  -dir D -name N -broker-ca-cert F -broker-ca-key F [-hosts 127.0.0.1]
//	keybroker serve -dir D -name N -operator-ca F -manufacturer-ca F -image-pubkey F
//	                [-appliance-listen 127.0.0.1:7441] [-operator-listen 127.0.0.1:8441]
//
// init creates the broker's TLS certificate and service CA under the broker
// CA, and its master key; serve runs the appliance and operator APIs.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/dataembassy/embassy/broker"
	"github.com/dataembassy/embassy/broker/pki"
	"github.com/dataembassy/embassy/images/imagekey"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: keybroker init|serve [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "init":
		err = initBroker(os.Args[2:])
	case "serve":
		err = serve(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "keybroker:", err)
		os.Exit(1)
	}
}

func initBroker(args []string) error {
	fs := flag.NewFlagSet("init", flag.ExitOnError)
	dir := fs.String("dir", "", "broker state folder")
	name := fs.String("name", "", "broker name")
	caCert := fs.String("broker-ca-cert", "", "home-state broker CA certificate")
	caKey := fs.String("broker-ca-key", "", "home-state broker CA key")
	hosts := fs.String("hosts", "127.0.0.1", "comma-separated names and addresses the broker is reached at")
	fs.Parse(args)
	if *dir == "" || *name == "" || *caCert == "" || *caKey == "" {
		return errors.New("init needs -dir, -name, -broker-ca-cert and -broker-ca-key")
	}
	if _, err := os.Stat(filepath.Join(*dir, "master.key")); err == nil {
		return fmt.Errorf("%s is already initialised", *dir)
	}
	ca, err := pki.LoadIssuer(*caCert, *caKey)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(*dir, 0o700); err != nil {
		return err
	}
	svc, err := ca.NewIntermediate(*name+" service CA", 5*365*24*time.Hour)
	if err != nil {
		return err
	}
	key, err := pki.NewKey()
	if err != nil {
		return err
	}
	leaf, err := ca.Leaf(*name, strings.Split(*hosts, ","), &key.PublicKey, 2*365*24*time.Hour)
	if err != nil {
		return err
	}
	if err := pki.WritePEM(filepath.Join(*dir, "tls.pem"), leaf, filepath.Join(*dir, "tls.key"), key); err != nil {
		return err
	}
	if err := pki.WritePEM(filepath.Join(*dir, "service-ca.pem"), svc.Cert, filepath.Join(*dir, "service-ca.key"), svc.Key); err != nil {
		return err
	}
	master := make([]byte, 32)
	if _, err := rand.Read(master); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(*dir, "master.key"), []byte(hex.EncodeToString(master)+"\n"), 0o600); err != nil {
		return err
	}
	fmt.Printf("broker %s initialised in %s\n", *name, *dir)
	return nil
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	dir := fs.String("dir", "", "broker state folder (from keybroker init)")
	name := fs.String("name", "", "broker name")
	opCA := fs.String("operator-ca", "", "home-state operator CA bundle")
	manuCA := fs.String("manufacturer-ca", "", "TPM manufacturer CA bundle (EK certificates)")
	imagePub := fs.String("image-pubkey", "", "image-signing public key")
	appAddr := fs.String("appliance-listen", "127.0.0.1:7441", "appliance API address")
	opAddr := fs.String("operator-listen", "127.0.0.1:8441", "operator API address")
	nonceTTL := fs.Duration("nonce-ttl", time.Minute, "lifetime of an attestation nonce")
	certTTL := fs.Duration("cert-ttl", time.Hour, "lifetime of an attested appliance certificate")
	reattest := fs.Duration("reattest", 5*time.Minute, "how often appliances re-attest")
	fs.Parse(args)
	if *dir == "" || *name == "" || *opCA == "" || *manuCA == "" || *imagePub == "" {
		return errors.New("serve needs -dir, -name, -operator-ca, -manufacturer-ca and -image-pubkey")
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil)).With("broker", *name)
	mk, err := os.ReadFile(filepath.Join(*dir, "master.key"))
	if err != nil {
		return fmt.Errorf("master key: %w", err)
	}
	master, err := hex.DecodeString(strings.TrimSpace(string(mk)))
	if err != nil || len(master) != 32 {
		return errors.New("master key must be 64 hex digits")
	}
	svc, err := pki.LoadIssuer(filepath.Join(*dir, "service-ca.pem"), filepath.Join(*dir, "service-ca.key"))
	if err != nil {
		return err
	}
	ops, err := pki.LoadPool(*opCA)
	if err != nil {
		return err
	}
	manu, err := pki.LoadPool(*manuCA)
	if err != nil {
		return err
	}
	img, err := imagekey.LoadPublic(*imagePub)
	if err != nil {
		return err
	}
	tlsCert, err := loadTLS(*dir)
	if err != nil {
		return err
	}
	b, err := broker.New(broker.Config{Name: *name, Dir: *dir, MasterKey: master, ManufacturerCAs: manu, ImageKey: img,
		ServiceCA: svc, NonceTTL: *nonceTTL, CertTTL: *certTTL, ReattestAfter: *reattest, Log: log})
	if err != nil {
		return err
	}
	defer b.Close()
	appSrv := &http.Server{Addr: *appAddr, Handler: b.ApplianceHandler(), TLSConfig: b.ApplianceTLSConfig(tlsCert),
		ReadHeaderTimeout: 10 * time.Second, ReadTimeout: time.Minute}
	opSrv := &http.Server{Addr: *opAddr, Handler: b.OperatorHandler(), TLSConfig: broker.OperatorTLSConfig(tlsCert, ops),
		ReadHeaderTimeout: 10 * time.Second, ReadTimeout: time.Minute}
	errc := make(chan error, 2)
	go func() { errc <- appSrv.ListenAndServeTLS("", "") }()
	go func() { errc <- opSrv.ListenAndServeTLS("", "") }()
	log.Info("broker serving", "appliance_api", *appAddr, "operator_api", *opAddr)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
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

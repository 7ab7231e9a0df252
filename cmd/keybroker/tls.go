package main

import (
	"crypto/tls"
	"fmt"
	"path/filepath"
)

func loadTLS(dir string) (tls.Certificate, error) {
	c, err := tls.LoadX509KeyPair(filepath.Join(dir, "tls.pem"), filepath.Join(dir, "tls.key"))
	if err != nil {
		return c, fmt.Errorf("broker TLS certificate: %w", err)
	}
	return c, nil
}

//go:build !linux

package efiboot

import "os"

// makeMutable only checks that path exists: efivarfs is Linux's.
func makeMutable(path string) error {
	_, err := os.Lstat(path)
	return err
}

// isEfivarfs is false: efivarfs is Linux's.
func isEfivarfs(string) bool { return false }

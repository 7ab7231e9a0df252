package store

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/dataembassy/embassy/appliance/objref"
)

// hasCopy reports whether root already holds a good copy of the object. A
// copy that cannot be read (a media error) is not good: the caller writes
// a new one, to new blocks. Only a disk whose objects folder is gone is an
// error.
func hasCopy(root, ns, name, digest string, data []byte) (bool, error) {
	existing, err := os.ReadFile(objectPath(root, ns, name, digest))
	if err == nil {
		// A damaged copy of the same object is replaced by the caller.
		return bytes.Equal(existing, data) || objref.Digest(existing) == digest, nil
	}
	if _, serr := os.Stat(filepath.Join(root, "objects")); serr != nil {
		return false, serr
	}
	return false, nil
}

// stageCopy writes data to a synced temp file on root.
func stageCopy(root string, data []byte) (string, error) {
	return stage(root, data, true)
}

// stage writes data to a temp file on root, synced if durable.
func stage(root string, data []byte, durable bool) (string, error) {
	var rnd [8]byte
	rand.Read(rnd[:])
	tmp := filepath.Join(root, "tmp", hex.EncodeToString(rnd[:])+".tmp")
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return "", err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(tmp)
		return "", err
	}
	if durable {
		// fdatasync: the data and the file size, without the timestamps.
		if err := unix.Fdatasync(int(f.Fd())); err != nil {
			f.Close()
			os.Remove(tmp)
			return "", err
		}
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return "", err
	}
	return tmp, nil
}

// commitCopy renames a staged copy into place and makes the rename durable.
func commitCopy(root, ns, name, digest, tmp string) error {
	return commit(root, ns, name, digest, tmp, true)
}

// commit renames a staged copy into place, durably if asked.
func commit(root, ns, name, digest, tmp string, durable bool) error {
	final := objectPath(root, ns, name, digest)
	if err := ensureDir(root, filepath.Dir(final)); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, final); err != nil {
		os.Remove(tmp)
		return err
	}
	if !durable {
		return nil
	}
	return syncDir(filepath.Dir(final))
}

// writeCopy writes one copy atomically and durably, unless a good copy is
// there already.
func writeCopy(root, ns, name, digest string, data []byte) error {
	if done, err := hasCopy(root, ns, name, digest, data); err != nil || done {
		return err
	}
	tmp, err := stageCopy(root, data)
	if err != nil {
		return err
	}
	return commitCopy(root, ns, name, digest, tmp)
}

// ensureDir creates dir and any missing parents below root, making each new
// directory entry durable in its parent.
func ensureDir(root, dir string) error {
	if _, err := os.Stat(dir); err == nil {
		return nil
	}
	rel, err := filepath.Rel(root, dir)
	if err != nil {
		return err
	}
	cur := root
	for _, part := range strings.Split(rel, string(filepath.Separator)) {
		next := filepath.Join(cur, part)
		if err := os.Mkdir(next, 0o700); err == nil {
			if err := syncDir(cur); err != nil {
				return err
			}
		} else if !errors.Is(err, fs.ErrExist) {
			return err
		}
		cur = next
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// Package boot holds the first steps of the appliance's init: mounting the
// pseudo-filesystems and loading the image's kernel modules.
package boot

import (
	"bufio"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/u-root/u-root/pkg/kmodule"
	"golang.org/x/sys/unix"
)

type mountPoint struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
}

var pseudoFilesystems = []mountPoint{
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
	{"securityfs", "/sys/kernel/security", "securityfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
	{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
}

// MountPseudoFilesystems mounts /proc, /sys, /dev, securityfs, /run and
// /tmp. A target that is already mounted is left as it is.
func MountPseudoFilesystems(log *slog.Logger) error {
	for _, m := range pseudoFilesystems {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			return fmt.Errorf("create %s: %w", m.target, err)
		}
		err := unix.Mount(m.source, m.target, m.fstype, m.flags, m.data)
		if errors.Is(err, unix.EBUSY) {
			continue
		}
		if err != nil {
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err)
		}
		log.Debug("mounted", "fstype", m.fstype, "target", m.target)
	}
	return nil
}

// ReadModuleList reads the list of modules to load, one name a line.
func ReadModuleList(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open module list: %w", err)
	}
	defer f.Close()
	var names []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		n := strings.TrimSpace(sc.Text())
		if n == "" || strings.HasPrefix(n, "#") {
			continue
		}
		names = append(names, n)
	}
	return names, sc.Err()
}

// LoadModules loads each named module with its dependencies from the image's
// modules.dep. A module that fails (for example a driver whose hardware is
// absent refusing to load) is reported and the others still load; the error
// names every failure.
func LoadModules(log *slog.Logger, names []string) error {
	prober, err := kmodule.NewProber(kmodule.ProbeOpts{})
	if err != nil {
		return fmt.Errorf("read modules.dep: %w", err)
	}
	var failed []string
	for _, n := range names {
		if err := prober.Probe(n, ""); err != nil {
			if errors.Is(err, unix.ENODEV) {
				// e.g. aesni_intel on a CPU without AES-NI: the generic
				// implementation built into the kernel is used instead.
				log.Info("module not applicable to this machine", "module", n, "err", err)
				continue
			}
			log.Warn("module load failed", "module", n, "err", err)
			failed = append(failed, n)
			continue
		}
		log.Debug("module loaded", "module", n)
	}
	if len(failed) > 0 {
		return fmt.Errorf("modules failed to load: %s", strings.Join(failed, ", "))
	}
	return nil
}

// Package verify checks a built image folder against its signed manifest:
// the signature, every component's SHA-256 and every measured-boot digest,
// each recomputed from the artifacts. It names each check that failed.
package verify

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/dataembassy/embassy/images/diskimage"
	"github.com/dataembassy/embassy/images/manifest"
	"github.com/dataembassy/embassy/images/measure"
	"github.com/dataembassy/embassy/images/uki"
)

// Check is one verified property.
type Check struct {
	Name string `json:"name"`
	OK   bool   `json:"ok"`
	Want string `json:"want,omitempty"`
	Got  string `json:"got,omitempty"`
	Err  string `json:"error,omitempty"`
}

// Report is the outcome of verifying an image folder.
type Report struct {
	Version uint64  `json:"version,omitempty"`
	Checks  []Check `json:"checks"`
}

// OK reports whether every check passed.
func (r *Report) OK() bool {
	if len(r.Checks) == 0 {
		return false
	}
	for _, c := range r.Checks {
		if !c.OK {
			return false
		}
	}
	return true
}

// Failed lists the names of the failed checks.
func (r *Report) Failed() []string {
	var out []string
	for _, c := range r.Checks {
		if !c.OK {
			out = append(out, c.Name)
		}
	}
	return out
}

// maxArtifact bounds what is read of one artifact.
const maxArtifact = 512 << 20

func readBounded(path string) ([]byte, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if st.Size() > maxArtifact {
		return nil, fmt.Errorf("%s is %d bytes, more than %d", path, st.Size(), maxArtifact)
	}
	return os.ReadFile(path)
}

// Dir verifies the image in dir with the image-signing public key pub. The
// manifest's signature must verify before anything else is checked; if it
// does not, the report holds just that failure.
func Dir(dir string, pub ed25519.PublicKey) *Report {
	rep := &Report{}
	add := func(c Check) { rep.Checks = append(rep.Checks, c) }
	mb, err := readBounded(filepath.Join(dir, manifest.File))
	if err != nil {
		add(Check{Name: manifest.File, Err: err.Error()})
		return rep
	}
	sb, err := readBounded(filepath.Join(dir, manifest.SignatureFile))
	if err != nil {
		add(Check{Name: manifest.SignatureFile, Err: err.Error()})
		return rep
	}
	m, err := manifest.Verify(mb, sb, pub)
	if err != nil {
		add(Check{Name: "signature", Err: err.Error()})
		return rep
	}
	add(Check{Name: "signature", OK: true})
	rep.Version = m.Version

	files := map[string][]byte{}
	for _, c := range m.Components {
		data, err := readBounded(filepath.Join(dir, c.Name))
		if err != nil {
			add(Check{Name: "component " + c.Name, Want: c.SHA256, Err: err.Error()})
			continue
		}
		files[c.Name] = data
		sum := sha256.Sum256(data)
		got := hex.EncodeToString(sum[:])
		add(Check{Name: "component " + c.Name, OK: got == c.SHA256, Want: c.SHA256, Got: got})
	}
	for _, req := range []string{manifest.ComponentKernel, manifest.ComponentInitramfs, manifest.ComponentCmdline, manifest.ComponentUKI, manifest.ComponentDisk} {
		if _, ok := m.Component(req); !ok {
			add(Check{Name: "component " + req, Err: "not listed in the manifest"})
		}
	}

	measurement := func(name, want string, compute func([]byte) (string, error), src string) {
		data, ok := files[src]
		if !ok {
			add(Check{Name: name, Want: want, Err: src + " unreadable"})
			return
		}
		got, err := compute(data)
		if err != nil {
			add(Check{Name: name, Want: want, Err: err.Error()})
			return
		}
		add(Check{Name: name, OK: got == want, Want: want, Got: got})
	}
	measurement("measurement pcr4_uki_authenticode", m.Measurements.UKIAuthenticode, func(b []byte) (string, error) {
		d, err := measure.Authenticode(b)
		return hex.EncodeToString(d[:]), err
	}, manifest.ComponentUKI)
	measurement("disk "+manifest.ComponentDisk+" boots "+manifest.ComponentUKI, m.Measurements.UKIAuthenticode, func(b []byte) (string, error) {
		d, err := diskimage.Inspect(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			return "", err
		}
		if len(d.Partitions) == 0 {
			return "", fmt.Errorf("no partitions")
		}
		boot, err := diskimage.ReadFile(d.Partitions[0].Open(bytes.NewReader(b)), diskimage.BootPath)
		if err != nil {
			return "", err
		}
		digest, err := measure.Authenticode(boot)
		return hex.EncodeToString(digest[:]), err
	}, manifest.ComponentDisk)
	measurement("measurement pcr11_uki_sections", m.Measurements.UKISections, func(b []byte) (string, error) {
		c, err := ParseCmdlineFile(files[manifest.ComponentCmdline])
		if err != nil {
			return "", err
		}
		d := uki.PredictPCR11(uki.Sections{Linux: files[manifest.ComponentKernel], OSRel: uki.OSRelease(m.Version),
			Cmdline: []byte(c), Initrd: b})
		return hex.EncodeToString(d[:]), nil
	}, manifest.ComponentInitramfs)
	measurement("measurement pcr9_load_options", m.Measurements.LoadOptions, func(b []byte) (string, error) {
		c, err := ParseCmdlineFile(b)
		if err != nil {
			return "", err
		}
		d := measure.Cmdline(c)
		return hex.EncodeToString(d[:]), nil
	}, manifest.ComponentCmdline)
	measurement("measurement pcr9_initrd", m.Measurements.Initrd, func(b []byte) (string, error) {
		d := measure.Initrd(b)
		return hex.EncodeToString(d[:]), nil
	}, manifest.ComponentInitramfs)
	return rep
}

// ParseCmdlineFile returns the command line stored in a cmdline artifact:
// one line of printable ASCII ending in a newline.
func ParseCmdlineFile(b []byte) (string, error) {
	s, ok := strings.CutSuffix(string(b), "\n")
	if !ok {
		return "", fmt.Errorf("cmdline file does not end in a newline")
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return "", fmt.Errorf("cmdline byte %d (%#x) is not printable ASCII", i, s[i])
		}
	}
	if s == "" {
		return "", fmt.Errorf("cmdline is empty")
	}
	return s, nil
}

// Package memclear overwrites the appliance's free memory, so that pages a
// stopped process or driver freed no longer hold what was in them. It runs
// once after a lockdown, when PID 1 has replaced its own process image:
// every page the old process held (shares, passphrases, volume keys in Go's
// heap, in luks.go's buffers, in device-mapper's table text) is free by
// then, and the kernel zeroes each page it hands to a process. So the
// package drops the page cache, takes nearly all available memory with
// populated anonymous mappings (zeroed by the kernel as they are faulted
// in) and gives it back. Pages still in use by the kernel are not touched;
// dm-crypt wipes its own key when a mapping is removed.
package memclear

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Reserve is the memory left available while clearing, so that the kernel
// and PID 1 never run short (an out-of-memory kill of PID 1 is a panic).
const Reserve = 96 << 20

// chunk is how much is mapped at a time.
const chunk = 32 << 20

// Free clears the free memory and returns how many bytes it overwrote.
// meminfo is normally /proc/meminfo and dropCaches /proc/sys/vm/drop_caches.
func Free(meminfo, dropCaches string) (int64, error) {
	unix.Sync()
	if err := os.WriteFile(dropCaches, []byte("3\n"), 0); err != nil {
		return 0, fmt.Errorf("drop page cache: %w", err)
	}
	var maps [][]byte
	defer func() {
		for _, m := range maps {
			unix.Munmap(m)
		}
	}()
	var cleared int64
	last := int64(-1)
	for {
		avail, err := available(meminfo)
		if err != nil {
			return cleared, err
		}
		if avail <= Reserve {
			return cleared, nil
		}
		// A mapping that did not lower the available memory was not
		// populated (MAP_POPULATE does not report failure): stop.
		if last >= 0 && avail > last-chunk/2 {
			return cleared, nil
		}
		last = avail
		n := min(int64(chunk), avail-Reserve)
		n &^= int64(os.Getpagesize() - 1)
		if n <= 0 {
			return cleared, nil
		}
		m, err := unix.Mmap(-1, 0, int(n), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
		if err != nil {
			if errors.Is(err, unix.ENOMEM) {
				return cleared, nil
			}
			return cleared, fmt.Errorf("map %d bytes: %w", n, err)
		}
		maps = append(maps, m)
		cleared += n
	}
}

// available reads MemAvailable (bytes) from a meminfo file.
func available(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "MemAvailable:" {
			kb, err := strconv.ParseInt(fields[1], 10, 64)
			if err != nil || kb < 0 {
				return 0, fmt.Errorf("%s: bad MemAvailable %q", path, fields[1])
			}
			return kb << 10, nil
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("%s: no MemAvailable", path)
}

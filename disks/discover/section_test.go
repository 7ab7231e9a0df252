package discover

import (
	"io"
	"os"
)

func newSection(f *os.File, off, size uint64) io.ReaderAt {
	return io.NewSectionReader(f, int64(off), int64(size))
}

package stream

import (
	"net"

	"golang.org/x/sys/unix"
)

const canTryWrite = true

// maxIovecs is the most buffers one writev takes (IOV_MAX).
const maxIovecs = 1024

// tryWrite writes what the socket accepts without waiting, in one writev,
// and consumes it from bufs. The fd is non-blocking (Go's runtime set it
// so); the callback's true return keeps the runtime from parking on
// EAGAIN, which is reported as no progress rather than an error.
func (s *ConnSink) tryWrite(bufs *net.Buffers) (int64, error) {
	if s.raw == nil {
		return 0, errNoTryWrite
	}
	iov := *bufs
	if len(iov) > maxIovecs {
		iov = iov[:maxIovecs]
	}
	var n int
	var werr error
	err := s.raw.Write(func(fd uintptr) bool {
		for {
			n, werr = unix.Writev(int(fd), iov)
			if werr != unix.EINTR {
				return true
			}
		}
	})
	if err == nil {
		err = werr
	}
	if err == unix.EAGAIN {
		err = nil
	}
	if n < 0 {
		n = 0
	}
	consume(bufs, int64(n))
	return int64(n), err
}

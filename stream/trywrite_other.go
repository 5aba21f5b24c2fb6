//go:build !linux

package stream

import "net"

const canTryWrite = false

func (s *ConnSink) tryWrite(*net.Buffers) (int64, error) { return 0, errNoTryWrite }

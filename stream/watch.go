package stream

import (
	"net"
	"sync/atomic"

	"go.uber.org/zap"
)

// watchByRead watches conn with a goroutine blocked in Read: the fallback
// where the poller cannot watch it, and for a TLS client that sent bytes.
// Reads are 512 bytes at a time and counted against budget: reading a byte
// at a time would let a client burn a core.
func watchByRead(logger *zap.Logger, conn net.Conn, budget int64, client Client, stopped *atomic.Bool) {
	go func() {
		defer func() {
			if v := recover(); v != nil {
				logger.Error("connection watcher panicked", zap.Any("panic", v), zap.Stack("stack"))
			}
		}()
		var b [512]byte
		for {
			n, err := conn.Read(b[:])
			budget -= int64(n)
			if err != nil || budget < 0 {
				// After stop, the connection was closed by its stream.
				if !stopped.Load() {
					client.ClientGone(err == nil)
				}
				return
			}
		}
	}()
}

// Client is told when the client of a watched connection is gone.
type Client interface {
	// ClientGone: the client closed its connection, or sent more than
	// its budget (overrun). Called once, and never after Stop.
	ClientGone(overrun bool)
}

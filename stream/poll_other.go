//go:build !linux

package stream

import (
	"net"
	"sync/atomic"
	"syscall"

	"go.uber.org/zap"
)

// Poller notices when the clients of taken-over connections close them. On
// this platform a goroutine reads each connection (epoll is Linux's).
type Poller struct{ logger *zap.Logger }

// NewPoller returns a poller.
func NewPoller(logger *zap.Logger) *Poller { return &Poller{logger: logger} }

// Watch is one connection the poller watches: its handle, for Stop.
type Watch struct{ stopped atomic.Bool }

// Watch tells client, once, when the client closes conn, or when it sent
// more than budget bytes (overrun true). Stop the returned watch before
// closing conn.
func (p *Poller) Watch(conn net.Conn, _ syscall.RawConn, budget int64, client Client) *Watch {
	w := new(Watch)
	watchByRead(p.logger, conn, budget, client, &w.stopped)
	return w
}

// Stop stops watching; call it before closing the connection.
func (p *Poller) Stop(w *Watch) { w.stopped.Store(true) }

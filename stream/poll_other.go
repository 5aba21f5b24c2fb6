//go:build !linux

package stream

import (
	"net"

	"go.uber.org/zap"
)

// Poller notices when the clients of taken-over connections close them. On
// this platform a goroutine reads each connection (epoll is Linux's).
type Poller struct{ logger *zap.Logger }

// NewPoller returns a poller.
func NewPoller(logger *zap.Logger) *Poller { return &Poller{logger: logger} }

// Watch calls onClose once when the client closes conn, or when it sent
// more than budget bytes (overrun true). Call stop before closing conn.
func (p *Poller) Watch(conn net.Conn, budget int64, onClose func(overrun bool)) (stop func()) {
	return watchByRead(p.logger, conn, budget, onClose)
}

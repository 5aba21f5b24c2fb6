package stream

import (
	"crypto/tls"
	"net"
	"sync"
	"sync/atomic"
	"syscall"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// Poller notices when the clients of taken-over connections close them or
// send what they may not, with one epoll instance and one goroutine for all
// connections instead of a goroutine blocked in Read per connection. It uses
// golang.org/x/sys/unix directly: the netpoll libraries that exist
// (gnet, nbio, netpoll) want to own the connection's reads and writes too,
// and this needs only readiness for reading, next to Go's own poller.
type Poller struct {
	logger *zap.Logger

	once sync.Once
	epfd int
	err  error

	mu      sync.Mutex
	next    uint64
	watched map[uint64]*Watch
}

// Watch is one connection the poller watches: its handle, for Stop.
type Watch struct {
	id      uint64
	raw     syscall.RawConn
	tls     net.Conn // the TLS connection, read through TLS; nil for plain
	budget  int64
	client  Client
	stopped atomic.Bool // Stop was called: tell the client nothing more
}

// NewPoller returns a poller; its goroutine starts with the first Watch.
func NewPoller(logger *zap.Logger) *Poller {
	return &Poller{logger: logger, watched: make(map[uint64]*Watch)}
}

// Watch tells client, once, on the poller's goroutine, when the client
// closes conn, or when it sent more than budget bytes (overrun true). What
// the client sends is read in bulk and discarded: an SSE response never
// ends, so nothing it sends can be a request that will be answered. raw,
// when not nil, is conn's own (saves making another). Stop the returned
// watch before closing conn.
func (p *Poller) Watch(conn net.Conn, raw syscall.RawConn, budget int64, client Client) *Watch {
	p.once.Do(p.start)
	w := &Watch{budget: budget, client: client, raw: raw}
	plain := conn
	if tc, ok := conn.(*tls.Conn); ok {
		w.tls, plain, w.raw = tc, tc.NetConn(), nil
	}
	if w.raw == nil {
		if sc, ok := plain.(syscall.Conn); ok {
			w.raw, _ = sc.SyscallConn()
		}
	}
	if p.err != nil || w.raw == nil {
		watchByRead(p.logger, conn, budget, client, &w.stopped)
		return w
	}
	p.mu.Lock()
	p.next++
	w.id = p.next
	p.watched[w.id] = w
	p.mu.Unlock()
	var cerr error
	err := w.raw.Control(func(fd uintptr) {
		// The event's data (Fd and Pad) carries the id, not the fd: an fd
		// number is reused once closed.
		ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP, Fd: int32(uint32(w.id)), Pad: int32(uint32(w.id >> 32))}
		cerr = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, int(fd), &ev)
	})
	if err != nil || cerr != nil {
		p.forget(w.id)
		watchByRead(p.logger, conn, budget, client, &w.stopped)
	}
	return w
}

// Stop stops watching; call it before closing the connection.
func (p *Poller) Stop(w *Watch) {
	w.stopped.Store(true)
	p.unwatch(w)
}

func (p *Poller) start() {
	p.epfd, p.err = unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if p.err != nil {
		p.logger.Warn("epoll unavailable: a goroutine watches each taken-over connection", zap.Error(p.err))
		return
	}
	go p.run()
}

func (p *Poller) forget(id uint64) *Watch {
	p.mu.Lock()
	defer p.mu.Unlock()
	w := p.watched[id]
	delete(p.watched, id)
	return w
}

// unwatch removes the connection from the epoll set; a closed fd would
// leave it by itself, but its number may be reused meanwhile.
func (p *Poller) unwatch(w *Watch) {
	if w.id == 0 || p.forget(w.id) == nil {
		return
	}
	_ = w.raw.Control(func(fd uintptr) {
		_ = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_DEL, int(fd), nil)
	})
}

func (p *Poller) run() {
	events := make([]unix.EpollEvent, 128)
	var buf [4096]byte
	for {
		n, err := unix.EpollWait(p.epfd, events, -1)
		if err != nil {
			if err == unix.EINTR {
				continue
			}
			p.logger.Error("epoll_wait failed; taken-over clients' closes go unnoticed until a write", zap.Error(err))
			return
		}
		for i := range n {
			id := uint64(uint32(events[i].Fd)) | uint64(uint32(events[i].Pad))<<32
			p.mu.Lock()
			w := p.watched[id]
			p.mu.Unlock()
			if w == nil {
				continue // stopped meanwhile
			}
			p.ready(w, events[i].Events, buf[:])
		}
	}
}

// ready handles a readable (or hung up) connection: a plain one is read
// here without blocking; a TLS one is handed to a goroutine that reads
// through TLS (a client that sends anything at all is rare).
func (p *Poller) ready(w *Watch, ev uint32, buf []byte) {
	if w.tls != nil {
		p.unwatch(w)
		if ev&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			w.client.ClientGone(false)
			return
		}
		watchByRead(p.logger, w.tls, w.budget, w.client, &w.stopped)
		return
	}
	gone, overrun := false, false
	for {
		var n int
		var rerr error
		err := w.raw.Read(func(fd uintptr) bool {
			n, rerr = unix.Read(int(fd), buf)
			return true
		})
		if err == nil {
			err = rerr
		}
		if err == unix.EAGAIN {
			break
		}
		if err != nil || n <= 0 {
			gone = true
			break
		}
		w.budget -= int64(n)
		if w.budget < 0 {
			gone, overrun = true, true
			break
		}
		if n < len(buf) {
			break
		}
	}
	if !gone && ev&(unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		gone = true
	}
	if gone {
		p.unwatch(w)
		w.client.ClientGone(overrun)
	}
}

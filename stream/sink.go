package stream

import (
	"crypto/tls"
	"net"
	"net/http"
	"reflect"
	"sync/atomic"
	"syscall"
	"time"
)

// Sink is where a stream's bytes go: Caddy's response writer, or the
// client's connection once the stream took it over.
type Sink interface {
	// Write writes bufs and flushes them to the client, blocking while the
	// client does not read. Only the stream's writer calls it, one call at a
	// time; it may consume bufs.
	Write(bufs *net.Buffers) (int64, error)
	// Interrupt makes a Write under way fail soon. It is safe from any
	// goroutine at any time, also after the stream ended.
	Interrupt()
	// Abandon closes the client's connection, for a write that Interrupt
	// could not end. Safe from any goroutine.
	Abandon()
}

// ConnSink writes to a connection taken over from the HTTP server.
type ConnSink struct {
	conn net.Conn
	raw  syscall.RawConn // nil when bytes cannot go straight to the socket (TLS)
}

// NewConnSink returns a sink writing to conn, which should be the innermost
// connection (see Innermost): writes on a plain TCP connection then reach
// the socket in one writev, and a frame the socket accepts at once is
// written by whoever queued it, without waking a goroutine.
func NewConnSink(conn net.Conn) *ConnSink {
	s := &ConnSink{conn: conn}
	if _, isTLS := conn.(*tls.Conn); !isTLS {
		if sc, ok := conn.(syscall.Conn); ok {
			if raw, err := sc.SyscallConn(); err == nil && canTryWrite {
				s.raw = raw
			}
		}
	}
	return s
}

func (s *ConnSink) Write(bufs *net.Buffers) (int64, error) {
	var n int64
	if s.raw != nil {
		// What the socket takes at once needs no blocking write, whose
		// writev keeps an iovec array in the connection for good.
		m, err := s.tryWrite(bufs)
		n += m
		if err != nil || len(*bufs) == 0 {
			return n, err
		}
	}
	m, err := bufs.WriteTo(s.conn)
	return n + m, err
}

// Interrupt sets a deadline in the past: a net.Conn's deadlines are safe to
// set from any goroutine, and the stream ends after a failed write.
func (s *ConnSink) Interrupt() { _ = s.conn.SetWriteDeadline(time.Now()) }

func (s *ConnSink) Abandon() { _ = s.conn.Close() }

// ResponseSink writes through an http.ResponseWriter: HTTP/2, HTTP/3, and
// HTTP/1.x when the connection is not taken over. Only the handler's
// goroutine may use the writer (Caddy's wrappers are not safe for
// concurrent use), so nothing else can interrupt a write: the writer arms
// a write deadline itself, lazily, so that it costs one call every few
// seconds rather than two per write (over HTTP/2 each one is a message to
// the connection's goroutine), and disarms it when the stream goes quiet,
// before it fires (over HTTP/2 an armed deadline resets the stream even
// with no write under way).
type ResponseSink struct {
	w     http.ResponseWriter
	rc    *http.ResponseController
	conn  net.Conn     // the client's connection, for Abandon; may be nil
	armed atomic.Int64 // unix nanoseconds of the armed write deadline; 0: none
}

// Deadline arming: a write starts with at least rearmAfter of its
// WriteTimeout left; the clock has the deadline disarmed once the stream
// is quiet and it is closer than disarmBefore.
const (
	rearmAfter   = 3 * time.Second
	disarmBefore = 2 * time.Second
)

// NewResponseSink returns a sink writing through w. conn, when known, is
// closed by Abandon.
func NewResponseSink(w http.ResponseWriter, conn net.Conn) *ResponseSink {
	return &ResponseSink{w: w, rc: http.NewResponseController(w), conn: conn}
}

// Start prepares the response for a stream: it clears the server's read
// and write deadlines, which a stream outlives, and sends the status when
// nobody did yet.
func (s *ResponseSink) Start(sendStatus bool) {
	if sendStatus {
		s.w.WriteHeader(http.StatusOK)
	}
	_ = s.rc.SetReadDeadline(time.Time{})
	_ = s.rc.SetWriteDeadline(time.Time{})
}

// Write writes and flushes under a deadline between WriteTimeout -
// rearmAfter and WriteTimeout away.
func (s *ResponseSink) Write(bufs *net.Buffers) (int64, error) {
	now := time.Now()
	if a := s.armed.Load(); a == 0 || time.Duration(a-now.UnixNano()) < WriteTimeout-rearmAfter {
		at := now.Add(WriteTimeout)
		_ = s.rc.SetWriteDeadline(at)
		s.armed.Store(at.UnixNano())
	}
	var n int64
	for _, b := range *bufs {
		m, err := s.w.Write(b)
		n += int64(m)
		if err != nil {
			return n, err
		}
	}
	*bufs = (*bufs)[:0]
	return n, s.rc.Flush()
}

// disarm clears the write deadline; on the writer's goroutine, between
// writes.
func (s *ResponseSink) disarm() {
	if s.armed.Swap(0) != 0 {
		_ = s.rc.SetWriteDeadline(time.Time{})
	}
}

// disarmDue reports whether the armed deadline is close enough to be
// cleared, at now, while no write is under way.
func (s *ResponseSink) disarmDue(now int64) bool {
	a := s.armed.Load()
	return a != 0 && time.Duration(a-now) < disarmBefore
}

// Interrupt does nothing: the writer's own deadline ends a blocked write
// (see ResponseSink).
func (s *ResponseSink) Interrupt() {}

func (s *ResponseSink) Abandon() {
	if s.conn != nil {
		_ = s.conn.Close()
	}
}

// Innermost follows the wrappers a server puts around a connection down to
// the one that reaches the socket, stopping at TLS, which must see every
// byte. It follows Unwrap and NetConn methods, and the embedded net.Conn of
// a struct that has no such method (Caddy's listener wrappers embed the
// connection only to watch the first bytes read, long done when a stream
// takes it over).
func Innermost(c net.Conn) net.Conn {
	for range 16 {
		var next net.Conn
		switch w := c.(type) {
		case *tls.Conn:
			return c
		case interface{ Unwrap() net.Conn }:
			next = w.Unwrap()
		case interface{ NetConn() net.Conn }:
			next = w.NetConn()
		case *net.TCPConn, *net.UnixConn:
			return c
		default:
			next = embeddedConn(c)
		}
		if next == nil {
			return c
		}
		c = next
	}
	return c
}

var connType = reflect.TypeFor[net.Conn]()

// embeddedConn returns the net.Conn embedded in the struct c is, or points
// to, if any.
func embeddedConn(c net.Conn) net.Conn {
	v := reflect.ValueOf(c)
	for v.Kind() == reflect.Pointer || v.Kind() == reflect.Interface {
		if v.IsNil() {
			return nil
		}
		v = v.Elem()
	}
	if v.Kind() != reflect.Struct {
		return nil
	}
	f, ok := v.Type().FieldByName("Conn")
	if !ok || !f.Anonymous || f.Type != connType || len(f.Index) != 1 {
		return nil
	}
	inner, _ := v.Field(f.Index[0]).Interface().(net.Conn)
	return inner
}

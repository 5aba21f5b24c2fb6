package caddysse

import (
	"bytes"
	"math/rand/v2"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-sse/caddy-sse/registry"
	"github.com/caddy-sse/caddy-sse/sse"
)

// A detached stream is an HTTP/1.x connection taken over once the stream is
// admitted: the response head is written by hand and the request's
// goroutine, its buffers and Caddy's per-request state are released. An idle
// stream then costs a socket and a few hundred bytes; a goroutine exists
// only while frames are being written. Keepalives, max_duration and exit
// are driven by one scanner for all detached streams.
type detached struct {
	h        *Handler
	sub      *registry.Subscriber
	channels []string
	release  func() // undoes the stream's admission; called once, at the end

	mode     atomic.Int32                            // modePending, modeDetached or modeStandard
	rc       atomic.Pointer[http.ResponseController] // until taken over: to cut a blocked write
	fallback chan struct{}                           // wakes the standard stream loop if takeover fails
	writing  atomic.Bool                             // a writer goroutine runs or is about to
	ended    atomic.Bool

	conn      net.Conn
	lastWrite atomic.Int64 // unix nanoseconds
	closeAt   int64        // max_duration end, unix nanoseconds; 0: none
	keepalive atomic.Bool  // a keepalive is due

	// Owned by the one writer goroutine running at a time.
	lastSeq uint64
	frames  []*registry.Frame
	bufs    net.Buffers
}

// The modes of a stream prepared for takeover.
const (
	modePending  = iota // frames wait in the queue
	modeDetached        // the connection is ours: writers write it
	modeStandard        // takeover failed: the request goroutine streams
)

// newDetached prepares a stream to be detached; it must be wired to the
// subscriber before Attach so that no wake is missed.
func newDetached(h *Handler, sub *registry.Subscriber, channels []string, after uint64, rc *http.ResponseController) *detached {
	d := &detached{h: h, sub: sub, channels: channels, lastSeq: after, fallback: make(chan struct{}, 1)}
	d.rc.Store(rc)
	sub.OnWake(d.wake)
	sub.OnOverflow(d.overflow)
	return d
}

// wake starts a writer unless one is running. Before the connection is
// taken over, frames just wait in the queue.
func (d *detached) wake() {
	switch d.mode.Load() {
	case modeDetached:
		if d.writing.CompareAndSwap(false, true) {
			go d.flush()
		}
	case modeStandard:
		select {
		case d.fallback <- struct{}{}:
		default:
		}
	}
}

// takeOver hijacks the connection and writes the response head, the opening
// comment and the replayed events. It returns false, with nothing written,
// when the connection cannot be hijacked (the caller then streams the
// standard way).
func (d *detached) takeOver(w http.ResponseWriter, r *http.Request, rc *http.ResponseController, head []byte, replay [][]byte) bool {
	// Bytes the client sent after the request (a POST body, say), left in
	// the returned reader, are not ours to read: only the write side
	// matters.
	conn, _, err := rc.Hijack()
	if err != nil {
		d.mode.Store(modeStandard)
		d.wake() // frames queued meanwhile
		return false
	}
	// From here on nothing of ours may keep the request alive.
	d.rc.Store(nil)
	_ = conn.SetReadDeadline(time.Time{})
	d.conn = conn
	out := make(net.Buffers, 0, 2+len(replay))
	out = append(out, responseHead(w.Header(), r), head)
	out = append(out, replay...)
	_ = conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	if _, err := out.WriteTo(conn); err != nil {
		d.finish("client")
		return true
	}
	metrics.delivered.Add(float64(len(replay)))
	d.lastWrite.Store(time.Now().UnixNano())
	if md := time.Duration(d.h.MaxDuration); md > 0 {
		d.closeAt = time.Now().Add(md - time.Duration(rand.Int64N(int64(md/10)+1))).UnixNano()
	}
	detachedStreams.add(d)
	d.mode.Store(modeDetached)
	d.wake() // frames queued meanwhile
	go d.watch()
	return true
}

// watch notices the client closing the connection (the stream would
// otherwise only find out at its next write), so that its channels are
// unsubscribed promptly. A goroutine blocked in Read on a one-byte buffer
// is the cheapest way Go offers to wait for that.
func (d *detached) watch() {
	var b [1]byte
	for {
		if _, err := d.conn.Read(b[:]); err != nil {
			d.sub.End("client")
			return
		}
	}
}

// responseHead is the HTTP/1.x status line and headers: the ones earlier
// handlers set (CORS, say) and the stream's own. The body runs until the
// connection closes.
func responseHead(hdr http.Header, r *http.Request) []byte {
	var b bytes.Buffer
	if r.ProtoMinor == 0 {
		b.WriteString("HTTP/1.0 200 OK\r\n")
	} else {
		b.WriteString("HTTP/1.1 200 OK\r\n")
	}
	names := make([]string, 0, len(hdr))
	for name := range hdr {
		switch http.CanonicalHeaderKey(name) {
		case "Content-Length", "Transfer-Encoding", "Connection", "Content-Encoding":
			continue
		}
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		for _, v := range hdr[name] {
			// Header values set by handlers are trusted, but a line break
			// would still end the head early: never write one.
			v = strings.Map(func(r rune) rune {
				if r == '\r' || r == '\n' {
					return ' '
				}
				return r
			}, v)
			b.WriteString(name)
			b.WriteString(": ")
			b.WriteString(v)
			b.WriteString("\r\n")
		}
	}
	b.WriteString("Date: ")
	b.WriteString(time.Now().UTC().Format(http.TimeFormat))
	b.WriteString("\r\nConnection: close\r\n\r\n")
	return b.Bytes()
}

// flush writes what is queued, in one write per round, until the queue is
// empty, then lets the goroutine go.
func (d *detached) flush() {
	for {
		frames, why := d.sub.Take(d.frames)
		d.frames = frames
		if why != registry.ReasonOverflow {
			if err := d.write(frames); err != nil {
				clear(frames)
				d.finish("client")
				return
			}
		}
		clear(frames)
		if why == registry.ReasonEvicted {
			// Tell the page, so that it closes its EventSource rather
			// than reconnect and evict the next oldest stream in turn.
			_ = d.conn.SetWriteDeadline(time.Now().Add(writeTimeout))
			_, _ = d.conn.Write(evictedFrame)
		}
		if why != "" {
			d.finish(why)
			return
		}
		d.writing.Store(false)
		// A wake between Take and Store saw a writer running and did
		// nothing: look again.
		if !d.sub.Pending() && !d.keepalive.Load() || !d.writing.CompareAndSwap(false, true) {
			return
		}
	}
}

func (d *detached) write(frames []*registry.Frame) error {
	bufs := d.bufs[:0]
	for _, f := range frames {
		if f.Seq != 0 {
			if f.Seq <= d.lastSeq {
				continue // already sent by the replay
			}
			d.lastSeq = f.Seq
		}
		if len(f.Bytes) > 0 {
			bufs = append(bufs, f.Bytes)
		}
	}
	n := len(bufs)
	if d.keepalive.Swap(false) && n == 0 {
		bufs = append(bufs, sse.Comment)
	}
	if len(bufs) == 0 {
		return nil
	}
	// WriteTo consumes the slice; keep the backing array for next time.
	d.bufs = bufs[:0]
	_ = d.conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	_, err := bufs.WriteTo(d.conn)
	clear(d.bufs[:cap(d.bufs)])
	if err != nil {
		return err
	}
	d.lastWrite.Store(time.Now().UnixNano())
	metrics.delivered.Add(float64(n))
	return nil
}

// overflow cuts short a write blocked on a client that stopped reading.
func (d *detached) overflow() {
	if d.mode.Load() == modeDetached {
		_ = d.conn.SetWriteDeadline(time.Now())
	} else if rc := d.rc.Load(); rc != nil {
		_ = rc.SetWriteDeadline(time.Now())
	}
}

// finish ends the stream once: the connection closes and the admission is
// undone (release detaches it from the registry).
func (d *detached) finish(why string) {
	if !d.ended.CompareAndSwap(false, true) {
		return
	}
	detachedStreams.remove(d)
	if d.conn != nil {
		_ = d.conn.Close()
	}
	d.release()
	metrics.streamsClosed.WithLabelValues(why).Inc()
	if ce := d.h.logger.Check(zap.DebugLevel, "stream closed"); ce != nil {
		ce.Write(zap.Strings("channels", d.channels), zap.String("reason", why), zap.Bool("detached", true))
	}
}

// detachedSet holds the detached streams for the scanner.
type detachedSet struct {
	mu      sync.Mutex
	streams map[*detached]struct{}
	started bool
}

var detachedStreams = &detachedSet{streams: make(map[*detached]struct{})}

func (s *detachedSet) add(d *detached) {
	s.mu.Lock()
	s.streams[d] = struct{}{}
	if !s.started {
		s.started = true
		go s.scan()
	}
	s.mu.Unlock()
}

func (s *detachedSet) remove(d *detached) {
	s.mu.Lock()
	delete(s.streams, d)
	s.mu.Unlock()
}

// wait returns once every detached stream has ended, or after at most d.
func (s *detachedSet) wait(d time.Duration) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		s.mu.Lock()
		n := len(s.streams)
		s.mu.Unlock()
		if n == 0 {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// scanInterval is how often keepalives and max_duration are checked: it
// bounds how late they may be.
const scanInterval = 250 * time.Millisecond

// scan sends keepalives to silent streams, ends those past max_duration,
// and ends all of them, with jitter, when Caddy exits.
func (s *detachedSet) scan() {
	t := time.NewTicker(scanInterval)
	defer t.Stop()
	var due []*detached
	for {
		select {
		case <-t.C:
		case <-exiting:
			s.mu.Lock()
			for d := range s.streams {
				d := d
				time.AfterFunc(time.Duration(rand.Int64N(int64(exitJitter))), func() { d.sub.End("shutdown") })
			}
			s.mu.Unlock()
			return
		}
		now := time.Now().UnixNano()
		due = due[:0]
		s.mu.Lock()
		for d := range s.streams {
			switch {
			case d.closeAt != 0 && now >= d.closeAt:
				due = append(due, d)
			case now-d.lastWrite.Load() >= int64(d.h.Keepalive):
				d.keepalive.Store(true)
				due = append(due, d)
			}
		}
		s.mu.Unlock()
		for _, d := range due {
			if d.closeAt != 0 && now >= d.closeAt {
				d.sub.End("max_duration")
				continue
			}
			d.wake()
		}
	}
}

package caddysse

import (
	"math/rand/v2"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

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
	life     *streamLife

	mode     atomic.Int32  // modePending, modeDetached or modeStandard
	fallback chan struct{} // wakes the standard stream loop if takeover fails
	writing  atomic.Bool   // a writer goroutine runs or is about to
	ended    atomic.Bool

	conn      net.Conn // set before mode becomes modeDetached
	started   time.Time
	lastWrite atomic.Int64 // unix nanoseconds
	end       streamDeadline
	keepalive atomic.Bool // a keepalive is due

	// Owned by the one writer goroutine running at a time.
	cur    *registry.Cursor // what was written: later duplicates are skipped
	frames []*registry.Frame
	bufs   net.Buffers
	events int64 // written, for the record of the stream's end
	bytes  int64
}

// count records n events of size bytes written.
func (d *detached) count(n, size int) {
	d.events += int64(n)
	d.bytes += int64(size)
	metrics.delivered.Add(float64(n))
}

// The modes of a stream prepared for takeover.
const (
	modePending  = iota // frames wait in the queue
	modeDetached        // the connection is ours: writers write it
	modeStandard        // takeover failed: the request goroutine streams
)

// newDetached prepares a stream to be detached; it must be wired to the
// subscriber before Attach so that no wake is missed.
func newDetached(h *Handler, sub *registry.Subscriber, channels []string) *detached {
	d := &detached{h: h, sub: sub, channels: channels, fallback: make(chan struct{}, 1)}
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
// comment and, when the client resumes, the history it missed, page by
// page. It returns false, with nothing written, when the connection cannot
// be hijacked (the caller then streams the standard way).
func (d *detached) takeOver(w http.ResponseWriter, r *http.Request, head []byte, cur *registry.Cursor, resume bool, from registry.EventID, end streamDeadline) bool {
	// net/http writes the head, so that Caddy's access log and metrics
	// record the 200 like any response's; "identity" makes it a body that
	// runs until the connection closes, unchunked (net/http's own setup for
	// Server-Sent Events). An encoder that took the response (encode)
	// cannot be bypassed once its header is out: then stream through it.
	w.Header().Set("Transfer-Encoding", "identity")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	if err := rc.Flush(); err != nil || w.Header().Get("Content-Encoding") != "" {
		return d.fallBack()
	}
	conn, brw, err := rc.Hijack()
	if err != nil {
		return d.fallBack()
	}
	// Write on the client's own connection, not through the wrappers Caddy
	// returns from Hijack: they count bytes into the request's recorder,
	// which the access log reads concurrently, and hide writev.
	if c, ok := r.Context().Value(connKey{}).(net.Conn); ok {
		conn = c
	}
	// Bytes the client sent after its request (a POST body, say) are not
	// ours to read; only how many there are matters (see watch).
	budget := int64(afterRequestBudget) + max(r.ContentLength, 0) - int64(brw.Reader.Buffered())
	_ = conn.SetReadDeadline(time.Time{})
	d.conn = conn
	d.started = time.Now()
	d.cur = cur
	if err := d.writeBufs(net.Buffers{head}); err != nil {
		d.sub.AbortReplay()
		d.finish(reasonClient)
		return true
	}
	if resume {
		err := d.h.replay(r.Context(), d.sub, cur, from, func(bufs [][]byte, events int) error {
			n := 0
			for _, b := range bufs {
				n += len(b)
			}
			if err := d.writeBufs(bufs); err != nil {
				return err
			}
			d.count(events, n)
			return nil
		})
		if err != nil {
			d.finish(d.failed())
			return true
		}
	}
	d.lastWrite.Store(time.Now().UnixNano())
	d.end = end
	detachedStreams.add(d)
	d.mode.Store(modeDetached)
	d.wake() // frames queued meanwhile
	go d.watch(budget)
	return true
}

// writeBufs writes bufs to the taken-over connection in one writev, with
// a deadline so that a client that stopped reading cannot hold it forever.
func (d *detached) writeBufs(bufs net.Buffers) error {
	_ = d.conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	_, err := bufs.WriteTo(d.conn)
	return err
}

// afterRequestBudget is how many bytes a client may send after its request
// (beyond a body it declared) before its connection is closed: an SSE
// response never ends, so nothing it sends can be a request we will answer.
const afterRequestBudget = 64 << 10

// watch notices the client closing the connection (the stream would
// otherwise only find out at its next write), so that its channels are
// unsubscribed promptly. Whatever the client sends is read in bulk and
// discarded, and past the budget the connection is closed: reading it a
// byte at a time would let a client burn a core.
func (d *detached) watch(budget int64) {
	defer recoverStream(d.h.logger, func() { d.sub.End(reasonClient) })
	var b [512]byte
	for {
		n, err := d.conn.Read(b[:])
		budget -= int64(n)
		if err != nil || budget < 0 {
			d.sub.End(reasonClient)
			if err == nil {
				// Unblock a writer stuck on a client that sends but
				// does not read.
				_ = d.conn.SetWriteDeadline(time.Now())
			}
			return
		}
	}
}

// fallBack gives the stream back to the request's goroutine, which streams
// the standard way, the status already written.
func (d *detached) fallBack() bool {
	d.mode.Store(modeStandard)
	d.wake() // frames queued meanwhile
	return false
}

// flush writes what is queued, in one write per round, until the queue is
// empty, then lets the goroutine go.
func (d *detached) flush() {
	defer recoverStream(d.h.logger, func() { d.finish("panic") })
	for {
		frames, why := d.sub.Take(d.frames)
		d.frames = frames
		if why != registry.ReasonOverflow {
			if err := d.write(frames); err != nil {
				clear(frames)
				d.finish(d.failed())
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
	// What the replay sent already is skipped; with ids per channel the
	// stream's own id line follows each resumable event.
	bufs, n, size := d.cur.AppendWire(d.bufs[:0], frames)
	if d.keepalive.Swap(false) && n == 0 {
		bufs = append(bufs, sse.Comment)
	}
	if len(bufs) == 0 {
		return nil
	}
	// WriteTo consumes the slice; keep the backing array for next time.
	d.bufs = bufs[:0]
	err := d.writeBufs(bufs)
	clear(d.bufs[:cap(d.bufs)])
	if err != nil {
		return err
	}
	d.lastWrite.Store(time.Now().UnixNano())
	d.count(n, size)
	return nil
}

// overflow cuts short a write blocked on a client that stopped reading. It
// runs on the delivering goroutine and touches only the taken-over
// connection, whose deadlines are safe to set from any goroutine; before the
// takeover nothing is written yet but the replay, which has its own.
func (d *detached) overflow() {
	if d.mode.Load() == modeDetached {
		_ = d.conn.SetWriteDeadline(time.Now())
	}
}

// failed is why a stream whose write failed ended.
func (d *detached) failed() string {
	if d.sub.Reason() == registry.ReasonOverflow {
		return registry.ReasonOverflow
	}
	return reasonClient
}

// finish ends the stream once: the connection closes and the admission is
// undone (release detaches it from the registry).
func (d *detached) finish(why string) {
	if !d.ended.CompareAndSwap(false, true) {
		return
	}
	detachedStreams.remove(d)
	_ = d.conn.Close()
	d.release()
	streamEnded(d.h.logger, why, d.channels, d.started, d.events, d.bytes, true)
	d.life.closed(why)
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
				time.AfterFunc(time.Duration(rand.Int64N(int64(exitJitter))), func() { d.sub.End(reasonShutdown) })
			}
			s.mu.Unlock()
			return
		}
		now := time.Now().UnixNano()
		due = due[:0]
		s.mu.Lock()
		for d := range s.streams {
			switch {
			case !d.end.at.IsZero() && now >= d.end.at.UnixNano():
				due = append(due, d)
			case now-d.lastWrite.Load() >= int64(d.h.Keepalive):
				d.keepalive.Store(true)
				due = append(due, d)
			}
		}
		s.mu.Unlock()
		for _, d := range due {
			if !d.end.at.IsZero() && now >= d.end.at.UnixNano() {
				d.sub.End(d.end.why)
				continue
			}
			d.wake()
		}
	}
}

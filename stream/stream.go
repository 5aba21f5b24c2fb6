// Package stream is the one writer of every Server-Sent Events stream. It
// drains a registry.Subscriber's queue into a Sink (Caddy's response writer,
// or the client's connection once taken over), skips what a replay already
// sent, sends keepalives, ends the stream at its deadline or on exit, cuts
// off a client that stopped reading, and records the stream's end once.
//
// A served stream (Serve) writes on the handler's goroutine, which the
// response writer requires. A taken-over stream (TakeOver) has no goroutine
// while idle: whoever queues a frame writes what the socket accepts at once,
// a goroutine runs only while the socket is full, one Clock drives the
// keepalives and deadlines of all streams and one Poller notices clients
// that close.
package stream

import (
	"context"
	"errors"
	"net"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-sse/caddy-sse/registry"
	"github.com/caddy-sse/caddy-sse/sse"
)

// Reasons a stream ends besides the registry's (a stream ended by the
// server's exit ends with registry.ReasonShutdown, as when its registry
// closes).
const (
	ReasonClient      registry.Reason = "client"        // the client went away or stopped reading
	ReasonMaxDuration registry.Reason = "max_duration"  // max_duration was reached
	ReasonExpired     registry.Reason = "token_expired" // the token that admitted it expired
	ReasonPanic       registry.Reason = "panic"         // a bug: logged with its stack
)

// Metrics receives what streams count.
type Metrics interface {
	Delivered(events int)
	Ended(reason registry.Reason)
}

// Options are the settings shared by the streams of one handler.
type Options struct {
	// Keepalive is how long a stream may stay silent before a comment is
	// sent; 0 disables keepalives.
	Keepalive time.Duration
	// Evicted is written to a stream that ends with registry.ReasonEvicted.
	Evicted []byte
	Logger  *zap.Logger
	Metrics Metrics
	// Clock drives keepalives, deadlines and stalled writes; Poller notices
	// taken-over clients that close. Both are shared by every stream.
	Clock  *Clock
	Poller *Poller
}

// Deadline is when a stream must end, and why; zero At: never.
type Deadline struct {
	At     time.Time
	Reason registry.Reason
}

// Result is what a stream's end reports.
type Result struct {
	Reason   registry.Reason
	Events   int64
	Bytes    int64
	Duration time.Duration
	Takeover bool
}

// Stream writes one subscriber's frames to its client.
type Stream struct {
	sub     *registry.Subscriber
	opts    *Options
	endAt   int64 // unix nanoseconds the stream must end at; 0: never
	endWhy  registry.Reason
	onEnd   func(Result)
	started int64 // unix nanoseconds

	sink   Sink
	conn   *ConnSink     // non-nil when the sink is the taken-over connection
	resp   *ResponseSink // non-nil when the sink is a response writer
	serveC chan struct{} // wakes Serve

	lastWrite  atomic.Int64          // unix nanoseconds of the last write
	writeSince atomic.Int64          // unix nanoseconds a blocking write began; 0: none
	watch      atomic.Pointer[Watch] // the poller's, while it watches

	// Four-byte fields together, so that the stream packs into fewer bytes.
	mode      atomic.Int32
	stalled   atomic.Int32 // 1: interrupted, 2: abandoned
	writing   atomic.Bool  // the writer token: a writer runs or is about to
	ended     atomic.Bool
	keepalive atomic.Bool // a keepalive is due
	endAsked  atomic.Bool // the deadline's End was sent
	disarm    atomic.Bool // the response's write deadline is to be cleared
	clockAt   int32       // index in the clock's list, under its lock; -1: not in it

	// Owned by whoever holds the writer token.
	cur     *registry.Cursor // what was written: later duplicates are skipped
	frames  []*registry.Frame
	bufs    net.Buffers
	pending *backlog        // what a non-blocking write left unwritten; nil: none so far
	carried registry.Reason // why the stream ends, taken with frames on the inline path

	events atomic.Int64
	bytes  atomic.Int64
}

// backlog is what the inline path could not write (the socket was full),
// for flushLive: apart, since most streams never need it.
type backlog struct {
	bufs   net.Buffers
	events int // the events and bytes bufs completes
	bytes  int
}

// Modes of a stream.
const (
	modePending = iota // frames wait in the queue (opening, replay)
	modeServe          // the handler's goroutine writes
	modeLive           // taken over: writers run on demand
)

// New prepares a stream for sub. It must be called before the subscriber is
// attached to the registry, so that no wake is missed; nothing is written
// until Serve or TakeOver, but what Write sends (the opening, a replay).
// onEnd runs once, when the stream ends.
func New(sub *registry.Subscriber, opts *Options, end Deadline, onEnd func(Result)) *Stream {
	s := &Stream{sub: sub, opts: opts, endWhy: end.Reason, onEnd: onEnd, started: time.Now().UnixNano(), clockAt: -1}
	if !end.At.IsZero() {
		s.endAt = end.At.UnixNano()
	}
	s.lastWrite.Store(s.started)
	sub.SetWaker(s)
	return s
}

// SetSink sets where the stream writes; before the first Write.
func (s *Stream) SetSink(sink Sink) {
	s.sink = sink
	if c, ok := sink.(*ConnSink); ok {
		s.conn = c
	}
	s.resp, _ = sink.(*ResponseSink)
	s.opts.Clock.add(s)
}

// SetCursor sets the stream's cursor (made once it is attached): it skips
// what a replay wrote already and, with ids per channel, writes the
// stream's own id line after each resumable event. Before Serve or TakeOver.
func (s *Stream) SetCursor(cur *registry.Cursor) { s.cur = cur }

// Write writes chunks at once, blocking (the opening, a page of history),
// before the stream is served or taken over.
func (s *Stream) Write(chunks [][]byte, events int) error {
	bufs := net.Buffers(chunks)
	size := 0
	for _, b := range chunks {
		size += len(b)
	}
	if err := s.writeBlocking(&bufs); err != nil {
		return err
	}
	s.count(events, size)
	return nil
}

// Serve writes the stream on the calling goroutine (the handler's) until
// it ends: the client goes (ctx), the registry ends it, or the clock does.
func (s *Stream) Serve(ctx context.Context) {
	defer s.recoverPanic()
	s.serveC = make(chan struct{}, 1)
	s.mode.Store(modeServe)
	s.wake() // frames queued meanwhile
	for {
		select {
		case <-s.serveC:
			if s.flush() {
				return
			}
		case <-ctx.Done():
			s.finish(ReasonClient)
			return
		}
	}
}

// TakeOver makes a stream whose sink is a ConnSink live on its own: the
// caller's goroutine may go. The poller watches the sink's connection for
// the client's close; budget is how many bytes the client may send before
// it is cut off.
func (s *Stream) TakeOver(budget int64) {
	s.watch.Store(s.opts.Poller.Watch(s.conn.conn, s.conn.raw, budget, s))
	if s.ended.Load() {
		// Ended meanwhile (the clock gave up a stalled write).
		s.stopWatching()
		return
	}
	s.mode.Store(modeLive)
	s.wake()
}

// End asks the stream to end, with what is queued written first.
func (s *Stream) End(reason registry.Reason) { s.sub.End(reason) }

// Abort ends a stream that failed before it was served or taken over.
func (s *Stream) Abort() {
	s.sub.AbortReplay()
	s.finish(s.failed())
}

// Wake is the registry telling that frames are queued or the stream must
// end (see registry.Waker).
func (s *Stream) Wake() { s.wake() }

// Overflow is the registry telling that the queue overflowed: a write
// blocked on that client is cut short.
func (s *Stream) Overflow() { s.interrupt() }

// wake runs whenever frames are queued or the stream must end (on the
// delivering goroutine), and from the clock.
func (s *Stream) wake() {
	switch s.mode.Load() {
	case modeServe:
		select {
		case s.serveC <- struct{}{}:
		default:
		}
	case modeLive:
		if !s.writing.CompareAndSwap(false, true) {
			return
		}
		if s.conn != nil && s.conn.raw != nil && s.writeInline() {
			return
		}
		go s.flushLive()
	}
}

// writeInline writes, on the caller's goroutine, what is queued as far as
// the socket takes it at once, and returns true when it is all written and
// the writer token released. Otherwise (the socket is full, the stream
// must end, an error) the token is still held, for flushLive to carry on.
func (s *Stream) writeInline() bool {
	for range 4 {
		frames, why := s.sub.Take(s.frames)
		s.frames = frames
		n, size := 0, 0
		if why != registry.ReasonOverflow {
			n, size = s.collect(frames)
		}
		clear(frames)
		if why != "" {
			// Ending is for a goroutine: the frames before it first.
			s.keep(s.bufs, n, size)
			clear(s.bufs[:cap(s.bufs)])
			s.bufs = s.bufs[:0]
			s.carried = why
			return false
		}
		if len(s.bufs) == 0 {
			s.keepalive.Store(false)
			s.writing.Store(false)
			if !s.more() {
				return true
			}
			continue
		}
		bufs := s.bufs
		s.bufs = s.bufs[:0]
		total := size
		if n == 0 {
			total = len(sse.Comment)
		}
		w, err := s.conn.tryWrite(&bufs)
		if err != nil {
			clear(s.bufs[:cap(s.bufs)])
			s.carried = s.failed()
			return false
		}
		if int(w) < total {
			// The socket is full: the rest waits for a writer that may block.
			s.keep(bufs, n, size)
			clear(s.bufs[:cap(s.bufs)])
			return false
		}
		clear(s.bufs[:cap(s.bufs)])
		s.wrote(n, size)
		s.writing.Store(false)
		if !s.more() {
			return true
		}
	}
	return false // busy: let a goroutine carry on
}

// more takes the writer token back when something arrived after it was
// released (a wake in between saw it held and did nothing).
func (s *Stream) more() bool {
	return (s.sub.Pending() || s.keepalive.Load()) && s.writing.CompareAndSwap(false, true)
}

// flushLive is a taken-over stream's writer goroutine: it writes, blocking,
// until the queue is empty, then lets the goroutine go.
func (s *Stream) flushLive() {
	defer s.recoverPanic()
	if p := s.pending; p != nil && len(p.bufs) > 0 {
		bufs := p.bufs
		err := s.writeBlocking(&bufs)
		clear(p.bufs[:cap(p.bufs)])
		p.bufs = p.bufs[:0]
		if err != nil {
			s.finish(s.failed())
			return
		}
		s.wrote(p.events, p.bytes)
	}
	if why := s.carried; why != "" {
		s.carried = ""
		s.ending(why)
		return
	}
	for !s.flush() {
		s.writing.Store(false)
		if !s.more() {
			return
		}
	}
}

// flush writes what is queued with blocking writes, and ends the stream
// when it must end; it reports whether the stream ended.
func (s *Stream) flush() bool {
	frames, why := s.sub.Take(s.frames)
	s.frames = frames
	if why != registry.ReasonOverflow {
		// An overflowed client resumes from history on reconnect: what is
		// queued would only be written to a socket that is not read.
		n, size := s.collect(frames)
		if len(s.bufs) > 0 {
			bufs := s.bufs
			err := s.writeBlocking(&bufs)
			clear(s.bufs[:cap(s.bufs)])
			s.bufs = s.bufs[:0]
			if err != nil {
				clear(frames)
				s.finish(s.failed())
				return true
			}
			s.wrote(n, size)
		}
	}
	clear(frames)
	if why != "" {
		s.ending(why)
		return true
	}
	if s.disarm.Swap(false) && s.resp != nil && s.writeSince.Load() == 0 {
		s.resp.disarm()
	}
	return false
}

// keep sets aside what the inline path could not write, for flushLive.
func (s *Stream) keep(bufs net.Buffers, events, size int) {
	if s.pending == nil {
		s.pending = new(backlog)
	}
	p := s.pending
	p.bufs = append(p.bufs[:0], bufs...)
	p.events, p.bytes = events, size
}

// ending ends the stream for why, after telling an evicted client.
func (s *Stream) ending(why registry.Reason) {
	if why == registry.ReasonEvicted && len(s.opts.Evicted) > 0 {
		// Tell the page, so that it closes its EventSource rather than
		// reconnect and evict the next oldest stream of its key in turn.
		bufs := net.Buffers{s.opts.Evicted}
		_ = s.writeBlocking(&bufs)
	}
	s.finish(why)
}

// collect puts the frames still to send into s.bufs (a keepalive comment
// when none is and one is due) and returns how many events and bytes. The
// cursor's id lines in s.bufs are valid until the next collect: whatever
// is kept unwritten (s.pending) is written before it runs again.
func (s *Stream) collect(frames []*registry.Frame) (n, size int) {
	var bufs [][]byte
	bufs, n, size = s.cur.AppendWire(s.bufs[:0], frames)
	if s.keepalive.Swap(false) && n == 0 {
		bufs = append(bufs, sse.Comment)
	}
	s.bufs = bufs
	return n, size
}

// writeBlocking writes bufs, blocking; the clock interrupts it when it
// stays blocked too long.
func (s *Stream) writeBlocking(bufs *net.Buffers) error {
	s.writeSince.Store(time.Now().UnixNano())
	_, err := s.sink.Write(bufs)
	s.writeSince.Store(0)
	return err
}

// wrote records a completed write of n events and size bytes.
func (s *Stream) wrote(n, size int) {
	s.lastWrite.Store(s.opts.Clock.now.Load()) // within a tick: keepalives need no better
	s.count(n, size)
}

func (s *Stream) count(n, size int) {
	if n == 0 {
		return
	}
	s.events.Add(int64(n))
	s.bytes.Add(int64(size))
	s.opts.Metrics.Delivered(n)
}

// interrupt cuts short a write blocked on a client that fell behind (its
// queue overflowed) or closed; it runs on other goroutines and touches only
// what is safe there.
func (s *Stream) interrupt() {
	if s.sink != nil {
		s.sink.Interrupt()
	}
}

// failed is why a stream whose write failed ended: the client fell behind
// (its queue overflowed while the write was blocked), or went away.
func (s *Stream) failed() registry.Reason {
	if s.sub.Reason() == registry.ReasonOverflow {
		return registry.ReasonOverflow
	}
	return ReasonClient
}

// finish ends the stream once: it leaves the clock and the poller, closes a
// taken-over connection, and reports the end.
func (s *Stream) finish(why registry.Reason) {
	if !s.ended.CompareAndSwap(false, true) {
		return
	}
	s.stopWatching()
	takeover := s.conn != nil
	if takeover {
		_ = s.conn.conn.Close()
	}
	res := Result{Reason: why, Events: s.events.Load(), Bytes: s.bytes.Load(),
		Duration: time.Duration(time.Now().UnixNano() - s.started), Takeover: takeover}
	s.opts.Metrics.Ended(why)
	if ce := s.opts.Logger.Check(zap.InfoLevel, "stream closed"); ce != nil {
		ce.Write(zap.Strings("channels", s.sub.Channels()), zap.String("reason", string(why)),
			zap.Duration("duration", res.Duration), zap.Int64("events", res.Events),
			zap.Int64("bytes", res.Bytes), zap.Bool("takeover", takeover))
	}
	if s.onEnd != nil {
		s.onEnd(res)
	}
	// Last: Clock.Wait returns once every stream's end is reported (a
	// lifecycle entry, say, is queued before Redis is let go).
	s.opts.Clock.remove(s)
}

// ClientGone runs on the poller when the client closed its connection, or
// sent more than it may (then the write under way is cut short too).
func (s *Stream) ClientGone(overrun bool) {
	s.sub.End(ReasonClient)
	if overrun {
		s.interrupt()
	}
}

func (s *Stream) stopWatching() {
	if w := s.watch.Swap(nil); w != nil {
		s.opts.Poller.Stop(w)
	}
}

// recoverPanic, deferred by the goroutines that write, keeps a panic there
// from taking the whole process down: it is logged and the stream ends.
func (s *Stream) recoverPanic() {
	v := recover()
	if v == nil {
		return
	}
	s.opts.Logger.Error("stream writer panicked; ending the stream", zap.Any("panic", v), zap.Stack("stack"))
	if s.sink != nil {
		s.sink.Abandon()
	}
	s.finish(ReasonPanic)
}

var errNoTryWrite = errors.New("stream: no non-blocking write on this connection")

// consume drops n written bytes from the front of bufs.
func consume(bufs *net.Buffers, n int64) {
	for len(*bufs) > 0 {
		l := int64(len((*bufs)[0]))
		if l > n {
			(*bufs)[0] = (*bufs)[0][n:]
			return
		}
		n -= l
		*bufs = (*bufs)[1:]
	}
}

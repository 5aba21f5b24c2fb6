package registry

import (
	"sync"

	"github.com/caddy-sse/caddy-sse/sse"
)

// Frame is one encoded event, immutable and shared by every subscriber that
// receives it.
type Frame struct {
	// Channel is the channel the event was published on.
	Channel string
	// Seq is the history sequence number (the event id), 0 when the event
	// is not resumable.
	Seq uint64
	// Bytes is the wire form; empty for a close without an event.
	Bytes []byte
	// Close ends the stream's subscription to Channel once this frame is
	// written, and the stream when it was its last open channel.
	Close bool
	// NeedsID is set when ids count per channel and the frame is a
	// resumable event for streams with history: Bytes lack the id line and
	// the blank line that ends the event, which each stream writes after
	// them, with its own id (Cursor.AppendID, or Cursor.AppendWire).
	NeedsID bool
}

// Reason is why a stream ends. Its string value is what metrics label and
// logs record; the stream package adds reasons of its own.
type Reason string

// Reasons a subscriber is ended by the registry or its limits.
const (
	ReasonOverflow Reason = "overflow" // the client fell `buffer` events behind
	ReasonClosed   Reason = "closed"   // a publisher ended every channel of the stream
	ReasonShutdown Reason = "shutdown" // the registry was closed, or the server is exiting
	ReasonEvicted  Reason = "evicted"  // a newer stream of its max_connections_per key replaced it
)

// Subscriber is one stream's end of the registry: a bounded queue of frames
// filled by the registry and drained by the stream's writer.
type Subscriber struct {
	channels []string
	format   sse.Format
	history  bool
	max      int

	wake  chan struct{} // nil once a Waker is set
	waker Waker

	mu        sync.Mutex
	queue     []*Frame
	reason    Reason // why the stream must end; "" while open
	closed    []bool // per channel: a publisher ended it
	open      int    // channels not closed
	replaying bool   // history is being replayed: see Replaying
	skipped   bool   // a resumable frame was left to the replay

	// With ids per channel: where each channel's history stood when the
	// stream was attached (set by Attach); nil otherwise.
	start *startPositions
}

// startPositions is where each channel's history stood, and whether that
// was known.
type startPositions struct {
	pos   []uint64
	known []bool
}

// NewSubscriber returns a subscriber to channels whose queue holds at most
// buffer frames. format selects the encoding of its frames;
// history marks the channels as resumable so that the registry catches them
// up after a Redis outage, and makes every id the stream sends a resume id.
func NewSubscriber(channels []string, format sse.Format, buffer int, history bool) *Subscriber {
	if buffer < 1 {
		buffer = 1
	}
	if format > sse.FormatEnvelope {
		// Decoded as raw anyway (see sse.Decode); the registry keeps one
		// frame per known format.
		format = sse.FormatRaw
	}
	return &Subscriber{
		channels: channels,
		format:   format,
		history:  history,
		max:      buffer,
		wake:     make(chan struct{}, 1),
		closed:   make([]bool, len(channels)),
		open:     len(channels),
	}
}

// Waker is what a stream with no goroutine of its own (or one that wants
// no channel per stream) is told instead of signalling Wake. Its methods
// run on the goroutine that queued a frame or ended the subscriber (the
// delivering goroutine, mostly) and must not block.
type Waker interface {
	// Wake: frames are queued, or the subscriber must end.
	Wake()
	// Overflow: the queue overflowed. The waker may interrupt a write
	// blocked on the client that fell behind, through a handle that is
	// safe to use from any goroutine at any time (a net.Conn's deadline;
	// never an http.ResponseWriter after its handler returned).
	Overflow()
}

// SetWaker sets w to be told instead of signalling Wake (whose channel it
// lets go: an idle stream keeps no more than it needs). Set it before
// Attach.
func (s *Subscriber) SetWaker(w Waker) { s.waker, s.wake = w, nil }

// Channels returns the channels the subscriber listens to.
func (s *Subscriber) Channels() []string { return s.channels }

// Wake is signalled whenever frames are queued or the subscriber must end,
// unless a Waker is set.
func (s *Subscriber) Wake() <-chan struct{} { return s.wake }

// Take moves the queued frames into buf (reused to avoid allocation) and
// returns them with the reason the stream must end, if any. The frames are
// to be written before ending.
func (s *Subscriber) Take(buf []*Frame) ([]*Frame, Reason) {
	s.mu.Lock()
	frames := s.queue
	s.queue = buf[:0]
	reason := s.reason
	s.mu.Unlock()
	return frames, reason
}

// Pending reports whether frames are queued or the stream must end: a
// writer that found nothing to do checks it again after declaring itself
// idle, so that nothing queued in between is left behind.
func (s *Subscriber) Pending() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.queue) > 0 || s.reason != ""
}

// Reason is why the stream must end, "" while it may go on.
func (s *Subscriber) Reason() Reason {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.reason
}

// End asks the stream to end for reason once it has written what is queued.
func (s *Subscriber) End(reason Reason) {
	s.mu.Lock()
	if s.reason == "" {
		s.reason = reason
	}
	s.mu.Unlock()
	s.signal()
}

// Replaying marks the stream as replaying history: until EndReplay, a
// resumable frame that finds the queue full is left to the replay (which
// reads it from history) instead of overflowing the queue, so that a long
// replay does not count against the buffer. Set it before Attach.
func (s *Subscriber) Replaying() {
	s.mu.Lock()
	s.replaying = true
	s.mu.Unlock()
}

// EndReplay ends the replay unless a resumable frame was left to it since
// the last call; then it returns false and the replay must read history
// once more.
func (s *Subscriber) EndReplay() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.skipped {
		s.skipped = false
		return false
	}
	s.replaying = false
	return true
}

// AbortReplay ends the replay at once, whatever it left to history: the
// stream is ending, or tells its client what it may have missed.
func (s *Subscriber) AbortReplay() {
	s.mu.Lock()
	s.replaying, s.skipped = false, false
	s.mu.Unlock()
}

// CloseChannel records that a publisher ended channel, and reports whether
// every channel of the stream is closed now (the stream then ends once
// what is queued is written). Closing a channel twice is harmless.
func (s *Subscriber) CloseChannel(channel string) (all bool) {
	s.mu.Lock()
	all = s.closeLocked(channel)
	s.mu.Unlock()
	if all {
		s.signal()
	}
	return all
}

func (s *Subscriber) closeLocked(channel string) bool {
	for i, c := range s.channels {
		if c == channel && !s.closed[i] {
			s.closed[i] = true
			s.open--
		}
	}
	if s.open > 0 {
		return false
	}
	if s.reason == "" {
		s.reason = ReasonClosed
	}
	return true
}

// push queues f without blocking. When the frame cannot be queued it
// returns why: the subscriber is ending, or its queue is full, in which case
// the subscriber is marked to end with ReasonOverflow.
func (s *Subscriber) push(f *Frame) (dropped Reason) {
	s.mu.Lock()
	if s.reason != "" {
		dropped = s.reason
		s.mu.Unlock()
		return dropped
	}
	if len(s.queue) >= s.max {
		if s.replaying && f.Seq != 0 {
			s.skipped = true
			s.mu.Unlock()
			return ""
		}
		s.reason = ReasonOverflow
		s.mu.Unlock()
		s.signal()
		if s.waker != nil {
			s.waker.Overflow()
		}
		return ReasonOverflow
	}
	s.queue = append(s.queue, f)
	if f.Close {
		s.closeLocked(f.Channel)
	}
	s.mu.Unlock()
	s.signal()
	return ""
}

func (s *Subscriber) signal() {
	if s.waker != nil {
		s.waker.Wake()
		return
	}
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

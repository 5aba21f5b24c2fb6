package stream

import (
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-sse/caddy-sse/registry"
)

// Write bounds, for a client that stopped reading.
const (
	// WriteTimeout is how long a write may stay blocked before it is
	// interrupted; the client's queue overflows meanwhile.
	WriteTimeout = 10 * time.Second
	// StallGrace is how long past WriteTimeout a write may still stay
	// blocked before the stream is given up and its connection closed:
	// over HTTP/2 the reset an interrupt queues cannot reach a client that
	// does not read its socket at all.
	StallGrace = 5 * time.Second
)

// Clock drives, for every stream of the process, what happens with time:
// keepalives, the stream's deadline, stalled writes, and the end of all
// streams when the server exits. One goroutine scans the streams a few
// times a second, so that a stream needs no timer of its own.
type Clock struct {
	tick time.Duration

	// now is the time of the last tick (unix nanoseconds): what a write
	// records as its time, for keepalives, without a clock read per write.
	now atomic.Int64

	mu      sync.Mutex
	streams []*Stream // each at its clockAt (a list scans faster than a map, and is smaller)
	running bool
	exiting bool
	idle    sync.Cond // signalled when streams becomes empty
}

// NewClock returns a clock that checks the streams every tick: it bounds how
// late a keepalive or deadline may be.
func NewClock(tick time.Duration) *Clock {
	c := &Clock{tick: tick}
	c.idle.L = &c.mu
	return c
}

func (c *Clock) add(s *Stream) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if i := int(s.clockAt); i >= 0 && i < len(c.streams) && c.streams[i] == s {
		return // added already
	}
	s.clockAt = int32(len(c.streams))
	c.streams = append(c.streams, s)
	if c.exiting {
		go s.End(registry.ReasonShutdown)
	}
	if !c.running {
		c.running = true
		c.now.Store(time.Now().UnixNano())
		go c.run()
	}
}

func (c *Clock) remove(s *Stream) {
	c.mu.Lock()
	if i := int(s.clockAt); i >= 0 && i < len(c.streams) && c.streams[i] == s {
		n := len(c.streams) - 1
		last := c.streams[n]
		c.streams[i], last.clockAt = last, int32(i)
		c.streams[n] = nil
		c.streams = c.streams[:n]
		if cap(c.streams) > 64 && n < cap(c.streams)/4 {
			c.streams = append([]*Stream(nil), c.streams...)
		}
	}
	s.clockAt = -1
	if len(c.streams) == 0 {
		c.idle.Broadcast()
	}
	c.mu.Unlock()
}

// Len returns how many streams the clock drives.
func (c *Clock) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.streams)
}

// Shutdown ends every stream, each after a random delay up to jitter, so
// that their clients do not all reconnect at the same instant; streams that
// start later end at once. Calling it again does nothing.
func (c *Clock) Shutdown(jitter time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.exiting {
		return
	}
	c.exiting = true
	for _, s := range c.streams {
		time.AfterFunc(time.Duration(rand.Int64N(int64(jitter)+1)), func() { s.End(registry.ReasonShutdown) })
	}
}

// Wait returns once no stream is left, or after d.
func (c *Clock) Wait(d time.Duration) {
	timer := time.AfterFunc(d, func() {
		c.mu.Lock()
		c.idle.Broadcast()
		c.mu.Unlock()
	})
	defer timer.Stop()
	deadline := time.Now().Add(d)
	c.mu.Lock()
	for len(c.streams) > 0 && time.Now().Before(deadline) {
		c.idle.Wait()
	}
	c.mu.Unlock()
}

// run scans the streams every tick while there are any.
func (c *Clock) run() {
	t := time.NewTicker(c.tick)
	defer t.Stop()
	var due []*Stream
	var what []byte
	for range t.C {
		now := time.Now().UnixNano()
		c.now.Store(now)
		due, what = due[:0], what[:0]
		c.mu.Lock()
		if len(c.streams) == 0 {
			c.running = false
			c.mu.Unlock()
			return
		}
		for _, s := range c.streams {
			if w := s.due(now); w != dueNothing {
				due = append(due, s)
				what = append(what, w)
			}
		}
		c.mu.Unlock()
		for i, s := range due {
			s.act(what[i])
		}
		clear(due)
	}
}

// What a stream is due for.
const (
	dueNothing = iota
	dueInterrupt
	dueAbandon
	dueEnd
	dueKeepalive
	dueDisarm
)

// due tells what the clock must do for s at now; it only reads atomics.
func (s *Stream) due(now int64) byte {
	if since := s.writeSince.Load(); since != 0 {
		switch blocked := time.Duration(now - since); {
		case blocked >= WriteTimeout+StallGrace && s.stalled.Load() < 2:
			return dueAbandon
		case blocked >= WriteTimeout && s.stalled.Load() < 1:
			return dueInterrupt
		}
		return dueNothing
	}
	if s.endAt != 0 && now >= s.endAt && !s.endAsked.Load() {
		return dueEnd
	}
	if k := s.opts.Keepalive; k > 0 && time.Duration(now-s.lastWrite.Load()) >= k && !s.keepalive.Load() {
		return dueKeepalive
	}
	if s.resp != nil && s.resp.disarmDue(now) && !s.disarm.Load() {
		return dueDisarm
	}
	return dueNothing
}

func (s *Stream) act(what byte) {
	switch what {
	case dueInterrupt:
		s.stalled.Store(1)
		s.interrupt()
	case dueAbandon:
		// The write is still blocked: end the stream (onEnd runs now, so
		// what it holds is released) and close the connection, which
		// unblocks it.
		s.stalled.Store(2)
		s.finish(s.failed())
		s.sink.Abandon()
	case dueEnd:
		s.endAsked.Store(true)
		s.sub.End(s.endWhy)
	case dueKeepalive:
		s.keepalive.Store(true)
		s.wake()
	case dueDisarm:
		s.disarm.Store(true)
		s.wake()
	}
}

package registry

import (
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/caddy-sse/caddy-sse/sse"
)

// fanOutSplit is the fewest subscribers worth handing to another goroutine.
// Queuing a frame is also writing it, for a taken-over stream whose socket
// takes it at once (one writev each): a channel of thousands of streams is
// split across the cores, as nginx splits its connections across workers,
// so that a broadcast is not held to one core while the others idle.
const fanOutSplit = 256

// closedFormats tells, per format, whether a message closed its channel:
// only an envelope can.
type closedFormats [2]bool

func (c *closedFormats) add(o closedFormats) {
	c[0] = c[0] || o[0]
	c[1] = c[1] || o[1]
}

// frameKinds holds a message's frame per format and history setting, each
// encoded at most once, so a message is encoded once per kind of stream
// however many streams receive it. Safe for the parts of a fan-out.
type frameKinds struct {
	byHistory bool
	encode    func(format sse.Format, history bool) *Frame
	mu        sync.Mutex // held while encoding
	frames    [2][2]atomic.Pointer[Frame]
}

func (k *frameKinds) of(s *Subscriber) *Frame {
	h := 0
	if k.byHistory && s.history {
		h = 1
	}
	slot := &k.frames[s.format][h]
	if f := slot.Load(); f != nil {
		return f
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	f := slot.Load()
	if f == nil {
		f = k.encode(s.format, s.history)
		slot.Store(f)
	}
	return f
}

// fanOut queues a frame on every subscriber of channel; frame is called at
// most once per format (and history setting, if byHistory). It reports the
// formats for which the frame closed the channel. It returns once every
// subscriber has the frame, so that frames reach each one in order.
func (r *Registry) fanOut(channel string, byHistory bool, frame func(format sse.Format, history bool) *Frame) (closed closedFormats) {
	r.mu.RLock()
	c := r.channels[channel]
	r.mu.RUnlock()
	if c == nil {
		return closed
	}
	subs := *c.subs.Load()
	kinds := frameKinds{byHistory: byHistory, encode: frame}
	parts := min(runtime.GOMAXPROCS(0), len(subs)/fanOutSplit)
	if parts <= 1 {
		return r.push(subs, &kinds)
	}
	size := (len(subs) + parts - 1) / parts
	found := make([]closedFormats, parts)
	var wg sync.WaitGroup
	for i := 1; i < parts; i++ {
		part := subs[i*size : min((i+1)*size, len(subs))]
		wg.Go(func() { found[i] = r.push(part, &kinds) })
	}
	found[0] = r.push(subs[:size], &kinds)
	wg.Wait()
	for _, f := range found {
		closed.add(f)
	}
	return closed
}

// push queues the message's frame on subs.
func (r *Registry) push(subs []*Subscriber, kinds *frameKinds) (closed closedFormats) {
	for _, s := range subs {
		f := kinds.of(s)
		if reason := s.push(f); reason != "" && r.metrics.Dropped != nil {
			r.metrics.Dropped.WithLabelValues(string(reason)).Inc()
		}
		closed[s.format] = closed[s.format] || f.Close
	}
	return closed
}

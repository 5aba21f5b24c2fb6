// Package registry is the hub of caddy-sse: it maps channels to the streams
// listening to them, subscribes each channel once per instance while it has
// listeners, and fans every published message out as one encoded frame to
// bounded per-stream queues without ever blocking on a slow stream.
package registry

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"math"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/caddy-sse/caddy-sse/sse"
)

// Message is one message from Redis: live, or read back from history.
type Message struct {
	Channel string
	Payload []byte
	// Seq is the history sequence number of a resumable event, else 0.
	Seq uint64
}

// Source is the Redis side as the registry needs it.
type Source interface {
	// Subscribe returns once Redis confirmed every channel, or with an error
	// when that is not possible now (the source then subscribes them when it
	// can).
	Subscribe(ctx context.Context, channels ...string) error
	// Unsubscribe must not block on Redis.
	Unsubscribe(channels ...string)
	// Replay returns the history of channels after the given sequence
	// number, merged in sequence order, and whether some of it was trimmed.
	Replay(ctx context.Context, channels []string, after uint64) ([]Message, bool, error)
	// ReplayPage returns one page of that history: about count messages
	// per channel, so that a resuming stream holds a bounded amount.
	ReplayPage(ctx context.Context, channels []string, after uint64, count int64) (Page, error)
}

// ChannelSource is a Source whose resumable ids count per channel (Redis
// Cluster in sharded mode, where each channel's counter lives on its own
// shard): ids of two channels do not compare, so the registry keeps a
// position per channel, and streams resume from a vector of them (see
// Cursor).
type ChannelSource interface {
	Source
	// PerChannel reports whether ids count per channel.
	PerChannel() bool
	// Heads returns the id of the newest event in each channel's history
	// (0 for none).
	Heads(ctx context.Context, channels []string) ([]uint64, error)
	// ReplayChannels returns one page of the history of channels, each
	// after its own position (after[i]): about count messages per channel.
	// Page.Next is not used.
	ReplayChannels(ctx context.Context, channels []string, after []uint64, count int64) (Page, error)
	// ReplayChannelsAll returns all of that history, and whether some of
	// it was trimmed.
	ReplayChannelsAll(ctx context.Context, channels []string, after []uint64) ([]Message, bool, error)
}

// Page is one page of history.
type Page struct {
	// Messages are every retained message of the channels after the
	// requested sequence number up to Next, in sequence order.
	Messages []Message
	// Truncated: some history after the requested number is gone.
	Truncated bool
	// More: there may be more after Next; ask again from Next.
	More bool
	// Next is the sequence number up to which the page is complete.
	Next uint64
}

// Metrics are the registry's counters; any may be nil.
type Metrics struct {
	// Dropped counts events not delivered to a stream, by reason.
	Dropped *prometheus.CounterVec
	// Faults counts repairs made to published messages, by reason.
	Faults *prometheus.CounterVec
}

// MissedEvent is the event type sent when a client may have missed events:
// its Last-Event-ID is older than the history kept, or Redis lost events.
const MissedEvent = "sse-missed"

// subscribeTimeout bounds how long one SUBSCRIBE may take before the streams
// waiting for it go on without the confirmation.
const subscribeTimeout = 5 * time.Second

// Options configure a Registry.
type Options struct {
	// Source is where channels are subscribed and history is read.
	Source Source
	// Logger receives faults and catch-ups, never one line per message.
	// Nil: no logging.
	Logger *zap.Logger
	// Metrics are the counters to update; any may be nil.
	Metrics Metrics
	// OnClose, if set, is called after a publisher closed a channel that
	// had streams, on the delivering goroutine: it must not block.
	OnClose func(channel string)
}

// Registry maps channels to subscribers. All methods are safe for
// concurrent use. Deliver may be called from several readers (one per
// shard in sharded mode): deliverMu puts them in one order.
type Registry struct {
	onClose func(channel string) // Options.OnClose

	src        Source
	perChannel ChannelSource // src, when its ids count per channel
	logger     *zap.Logger
	metrics    Metrics

	mu       sync.RWMutex
	channels map[string]*channel
	dirty    map[string]struct{} // channels whose subscription may need a change
	started  bool
	closed   bool

	kick chan struct{} // wakes the subscription reconciler
	done chan struct{} // closed by Close
	wg   sync.WaitGroup

	// deliverMu orders live delivery and the catch-ups after an outage,
	// and guards the fields below.
	deliverMu   sync.Mutex
	holding     bool          // live messages are held until a catch-up
	holdAfter   uint64        // lastSeq when holding began: catch up after it
	disconnects uint64        // counts outages of the whole subscription
	pending     []Message     // live messages held back while catching up
	missed      []Message     // read back by the catch-ups under way
	lastSeq     atomic.Uint64 // highest sequence number delivered
	// With ids per channel: the highest id delivered (or found in history
	// when it was subscribed) per subscribed channel; a channel missing
	// has none known.
	heads map[string]uint64
	// Channels held by HoldChannels (an outage of their shard, or a move
	// to another one): how many holds each, and what arrived meanwhile
	// (live) or was read back by catch-ups that could not end the hold.
	held       map[string]int
	heldLive   map[string][]Message
	heldMissed map[string][]Message
}

type channel struct {
	name    string
	refs    int  // under Registry.mu
	history bool // under Registry.mu: some listener wants catch-up
	subs    atomic.Pointer[[]*Subscriber]
	ready   chan struct{} // under Registry.mu; closed once subscribed: confirmed, or left to the source to retry
}

// New returns a registry that subscribes through opts.Source. It starts
// nothing: the source may still be getting ready (it may need the registry
// to deliver to) until Start.
func New(opts Options) *Registry {
	logger := opts.Logger
	if logger == nil {
		logger = zap.NewNop()
	}
	r := &Registry{
		src:        opts.Source,
		logger:     logger,
		metrics:    opts.Metrics,
		onClose:    opts.OnClose,
		channels:   make(map[string]*channel),
		dirty:      make(map[string]struct{}),
		kick:       make(chan struct{}, 1),
		done:       make(chan struct{}),
		heads:      make(map[string]uint64),
		held:       make(map[string]int),
		heldLive:   make(map[string][]Message),
		heldMissed: make(map[string][]Message),
	}
	if cs, ok := opts.Source.(ChannelSource); ok && cs.PerChannel() {
		r.perChannel = cs
	}
	return r
}

// Start starts subscribing: call it once the source is ready, before the
// first Attach. Calls after the first, or after Close, do nothing.
func (r *Registry) Start() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.started || r.closed {
		return
	}
	r.started = true
	r.wg.Add(1)
	go r.reconcile()
}

// ErrClosed is returned by Attach once the registry is closed.
var ErrClosed = errors.New("registry closed")

// Attach adds s to its channels and returns once every channel is
// subscribed in Redis (or Redis cannot confirm it now and the source
// subscribes it when it can), so that no event published after Attach
// returns is missed. On error s is not attached.
func (r *Registry) Attach(ctx context.Context, s *Subscriber) error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return ErrClosed
	}
	if !r.started {
		r.mu.Unlock()
		panic("registry: Attach before Start")
	}
	waits := make([]chan struct{}, 0, len(s.channels))
	for _, name := range s.channels {
		c := r.channels[name]
		if c == nil {
			c = &channel{name: name, ready: make(chan struct{})}
			empty := make([]*Subscriber, 0)
			c.subs.Store(&empty)
			r.channels[name] = c
			r.dirty[name] = struct{}{}
		}
		c.refs++
		c.history = c.history || s.history
		c.add(s)
		waits = append(waits, c.ready)
	}
	r.mu.Unlock()
	r.signal()

	for _, ready := range waits {
		select {
		case <-ready:
		case <-ctx.Done():
			r.Detach(s)
			return ctx.Err()
		case <-r.done:
			// Closed before the reconciler got to these channels: they
			// will never be ready, and Close ended s already.
			r.Detach(s)
			return ErrClosed
		}
	}
	if r.perChannel != nil && s.history {
		// Where each channel stands as the stream starts: whatever is
		// delivered from now on is newer (delivery holds deliverMu), and
		// what was queued before is not the stream's.
		r.deliverMu.Lock()
		start := &startPositions{pos: make([]uint64, len(s.channels)), known: make([]bool, len(s.channels))}
		for i, name := range s.channels {
			start.pos[i], start.known[i] = r.heads[name]
		}
		s.start = start
		r.deliverMu.Unlock()
	}
	return nil
}

// Detach removes s from its channels; a channel nobody listens to any more
// is unsubscribed.
func (r *Registry) Detach(s *Subscriber) {
	r.mu.Lock()
	for _, name := range s.channels {
		c := r.channels[name]
		if c == nil || !c.remove(s) {
			continue
		}
		c.refs--
		if c.refs == 0 {
			delete(r.channels, name)
			r.dirty[name] = struct{}{}
		}
	}
	r.mu.Unlock()
	r.signal()
}

// signal wakes reconcile; a wake-up still pending covers this one.
func (r *Registry) signal() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// reconcile is the only goroutine that subscribes and unsubscribes, so that
// the commands reach Redis in the order the registry decided them, and a
// burst of new streams costs one SUBSCRIBE.
func (r *Registry) reconcile() {
	defer r.wg.Done()
	subscribed := make(map[string]bool)
	for {
		select {
		case <-r.kick:
		case <-r.done:
			return
		}
		add, remove := r.takeChanges(subscribed)
		if len(remove) > 0 {
			r.unsubscribe(remove)
		}
		if len(add) > 0 {
			r.subscribe(add)
		}
	}
}

// takeChanges turns the dirty channels into the channels to subscribe and
// those to unsubscribe, and records them in subscribed.
func (r *Registry) takeChanges(subscribed map[string]bool) (add []*channel, remove []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for name := range r.dirty {
		c := r.channels[name]
		switch {
		case c != nil && !subscribed[name]:
			add = append(add, c)
			subscribed[name] = true
		case c == nil && subscribed[name]:
			remove = append(remove, name)
			delete(subscribed, name)
		case c != nil:
			// Re-created while still subscribed: confirmed already.
			c.markReady()
		}
	}
	clear(r.dirty)
	return add, remove
}

// unsubscribe unsubscribes channels and forgets their heads.
func (r *Registry) unsubscribe(names []string) {
	r.src.Unsubscribe(names...)
	if r.perChannel != nil {
		r.deliverMu.Lock()
		for _, name := range names {
			delete(r.heads, name)
		}
		r.deliverMu.Unlock()
	}
}

// subscribe subscribes channels, then lets the streams waiting for them go
// on, confirmed or not.
func (r *Registry) subscribe(channels []*channel) {
	names := make([]string, len(channels))
	for i, c := range channels {
		names[i] = c.name
	}
	ctx, cancel := context.WithTimeout(context.Background(), subscribeTimeout)
	err := r.src.Subscribe(ctx, names...)
	cancel()
	if err != nil {
		// The source keeps the channels and subscribes them when it
		// can; streams go on meanwhile and catch up from history.
		r.logger.Warn("subscribe not confirmed",
			zap.Strings("channels", names), zap.Error(err))
	}
	if r.perChannel != nil {
		r.readHeads(names)
	}
	r.mu.Lock()
	for _, c := range channels {
		c.markReady()
	}
	r.mu.Unlock()
}

// readHeads learns, once channels are subscribed, the newest id in their
// history: a stream that starts now has seen everything up to it. A channel
// whose head cannot be read stays unknown until an event or a catch-up
// tells it.
func (r *Registry) readHeads(names []string) {
	ctx, cancel := context.WithTimeout(context.Background(), subscribeTimeout)
	heads, err := r.perChannel.Heads(ctx, names)
	cancel()
	if err != nil {
		r.logger.Warn("cannot read where the history of new channels stands: streams opened now may miss events if Redis fails before their first event",
			zap.Strings("channels", names), zap.Error(err))
		return
	}
	r.deliverMu.Lock()
	for i, name := range names {
		r.raiseHeadLocked(name, heads[i])
	}
	r.deliverMu.Unlock()
}

// resumable reports whether some stream of c resumes (catches up from
// history) and c is subscribed. It runs under Registry.mu.
func (c *channel) resumable() bool {
	if !c.history {
		return false
	}
	select {
	case <-c.ready:
		return true
	default:
		return false
	}
}

// markReady lets the streams waiting for c go on. It runs under
// Registry.mu.
func (c *channel) markReady() {
	if c.ready != readyDone {
		close(c.ready)
		c.ready = readyDone // the channel's own can go: an idle channel keeps less
	}
}

// readyDone is the ready channel of every channel whose subscribe is done.
var readyDone = func() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}()

// add and remove replace the subscriber list (copy on write) so that
// delivery reads it without a lock. Both run under Registry.mu.
func (c *channel) add(s *Subscriber) {
	old := *c.subs.Load()
	next := make([]*Subscriber, len(old), len(old)+1)
	copy(next, old)
	next = append(next, s)
	c.subs.Store(&next)
}

func (c *channel) remove(s *Subscriber) bool {
	old := *c.subs.Load()
	for i, x := range old {
		if x == s {
			next := make([]*Subscriber, 0, len(old)-1)
			next = append(next, old[:i]...)
			next = append(next, old[i+1:]...)
			c.subs.Store(&next)
			return true
		}
	}
	return false
}

// Deliver fans a live message out to the subscribers of its channel, or
// holds it while its channel, or the whole subscription, is being caught
// up. It never blocks on a subscriber.
func (r *Registry) Deliver(m Message) {
	r.deliverMu.Lock()
	switch {
	case r.held[m.Channel] > 0:
		r.heldLive[m.Channel] = append(r.heldLive[m.Channel], m)
	case r.holding:
		r.pending = append(r.pending, m)
	default:
		r.deliverLocked(m)
	}
	r.deliverMu.Unlock()
}

// routeLocked delivers m unless its channel is held, in which case it
// waits, with what the channel's catch-up reads back, for the hold to end.
func (r *Registry) routeLocked(m Message, missed bool) {
	if r.held[m.Channel] == 0 {
		r.deliverLocked(m)
		return
	}
	if missed {
		r.heldMissed[m.Channel] = append(r.heldMissed[m.Channel], m)
	} else {
		r.heldLive[m.Channel] = append(r.heldLive[m.Channel], m)
	}
}

// HoldChannels is Disconnected for some channels only, with ids per
// channel (a shard's connection was lost, or their slot moved to another
// shard): their live messages are held until ReleaseChannels catches them
// up, while the other channels go on. Holds add up: each needs its
// release. Without ids per channel it is Disconnected.
func (r *Registry) HoldChannels(channels []string) {
	r.deliverMu.Lock()
	defer r.deliverMu.Unlock()
	if r.perChannel == nil {
		r.disconnects++
		r.holdLocked()
		return
	}
	for _, c := range channels {
		r.held[c]++
	}
}

// ReleaseChannels ends one hold of channels (HoldChannels): once a channel
// is held no more, what its history holds after its head is delivered,
// then what arrived live meanwhile, without duplicates. A channel whose
// head is unknown is told it may have missed events. Without ids per
// channel it is Reconnected.
func (r *Registry) ReleaseChannels(ctx context.Context, channels []string) {
	if r.perChannel == nil {
		r.Reconnected(ctx)
		return
	}
	start := time.Now()
	r.deliverMu.Lock()
	cu := r.planCatchUpLocked(channels)
	// Of the channels whose head is unknown, only the subscribed ones with
	// resuming streams are told: one still being subscribed reads its head
	// once it is, and no stream of it started before.
	r.mu.RLock()
	cu.unknown = slices.DeleteFunc(cu.unknown, func(name string) bool {
		c := r.channels[name]
		return c == nil || !c.resumable()
	})
	r.mu.RUnlock()
	r.deliverMu.Unlock()

	r.readBack(ctx, &cu, "catch-up of channels failed: events may be lost")

	r.deliverMu.Lock()
	r.tellMissedLocked(&cu)
	r.endHoldsLocked(channels, cu.missed)
	r.deliverMu.Unlock()
	if len(cu.missed) > 0 {
		r.logger.Info("caught up channels", zap.Int("events", len(cu.missed)),
			zap.Int("channels", len(cu.known)), zap.Duration("took", time.Since(start)))
	}
}

// endHoldsLocked ends one hold of each of channels, given what their
// catch-up read back: a channel held no more gets what its catch-ups read
// back, in sequence order, then what arrived live meanwhile.
func (r *Registry) endHoldsLocked(channels []string, missed []Message) {
	byChannel := make(map[string][]Message)
	for _, m := range missed {
		byChannel[m.Channel] = append(byChannel[m.Channel], m)
	}
	for _, c := range channels {
		r.heldMissed[c] = append(r.heldMissed[c], byChannel[c]...)
		if r.held[c] > 1 {
			r.held[c]--
			continue // still held: a later release delivers
		}
		delete(r.held, c)
		back, live := r.heldMissed[c], r.heldLive[c]
		delete(r.heldMissed, c)
		delete(r.heldLive, c)
		slices.SortStableFunc(back, func(a, b Message) int { return cmp.Compare(a.Seq, b.Seq) })
		for _, m := range back {
			r.releaseLocked(m, true)
		}
		for _, m := range live {
			r.releaseLocked(m, false)
		}
	}
}

// releaseLocked delivers what a channel's hold kept, unless everything is
// held (Disconnected): then it waits for that catch-up, in order.
func (r *Registry) releaseLocked(m Message, missed bool) {
	switch {
	case !r.holding:
		r.deliverLocked(m)
	case missed:
		r.missed = append(r.missed, m)
	default:
		r.pending = append(r.pending, m)
	}
}

func (r *Registry) deliverLocked(m Message) {
	switch {
	case m.Seq == 0:
	case r.perChannel != nil:
		if h, ok := r.heads[m.Channel]; ok && m.Seq <= h {
			return // already delivered by a catch-up
		}
		// Kept while the channel is subscribed (from its subscription to
		// its unsubscription, even with no stream for a moment), never
		// for a late message after it.
		_, known := r.heads[m.Channel]
		if !known {
			r.mu.RLock()
			_, known = r.channels[m.Channel]
			r.mu.RUnlock()
		}
		if known {
			r.heads[m.Channel] = m.Seq
		}
	default:
		if m.Seq <= r.lastSeq.Load() {
			return // already delivered by a catch-up
		}
		r.lastSeq.Store(m.Seq)
	}
	// A resumable message has the same id on every stream: only a plain
	// one is encoded apart for streams with history. With ids per channel
	// a stream with history writes its own id, so every message is.
	closed := r.fanOut(m.Channel, m.Seq == 0 || r.perChannel != nil, func(format sse.Format, history bool) *Frame {
		return r.Encode(format, history, m)
	})
	if closed != (closedFormats{}) {
		r.leaveClosed(m.Channel, closed)
		if r.onClose != nil {
			r.onClose(m.Channel)
		}
	}
}

// leaveClosed detaches from channel the streams a publisher's close ended
// it for: they have the close queued and go on with their other channels.
// A channel nobody listens to any more is unsubscribed.
func (r *Registry) leaveClosed(name string, closed closedFormats) {
	r.mu.Lock()
	if c := r.channels[name]; c != nil {
		old := *c.subs.Load()
		next := make([]*Subscriber, 0, len(old))
		for _, s := range old {
			if !closed[s.format] {
				next = append(next, s)
			}
		}
		c.subs.Store(&next)
		c.refs -= len(old) - len(next)
		if c.refs == 0 {
			delete(r.channels, name)
			r.dirty[name] = struct{}{}
		}
	}
	r.mu.Unlock()
	r.signal()
}

// Leave detaches s from one channel a publisher closed, found in its
// replayed history; it reports whether every channel of s is closed now.
func (r *Registry) Leave(s *Subscriber, channel string) (all bool) {
	r.mu.Lock()
	if c := r.channels[channel]; c != nil && c.remove(s) {
		c.refs--
		if c.refs == 0 {
			delete(r.channels, channel)
			r.dirty[channel] = struct{}{}
		}
	}
	r.mu.Unlock()
	r.signal()
	return s.CloseChannel(channel)
}

// Encode turns a message into a frame for the given format, counting the
// repairs it needed. A resumable message's sequence number is its id; for a
// stream with history, a message that is not resumable carries no id at
// all, so that the client's Last-Event-ID is always a resume point.
func (r *Registry) Encode(format sse.Format, history bool, m Message) *Frame {
	ev, fault := sse.Decode(format, m.Payload)
	open := false // the stream writes the id line and the end of the event
	switch {
	case m.Seq != 0 && history && r.perChannel != nil:
		ev.ID, open = "", true
	case m.Seq != 0:
		ev.ID = strconv.FormatUint(m.Seq, 10)
	case history:
		ev.ID = ""
	}
	f := &Frame{Channel: m.Channel, Seq: m.Seq, Close: ev.Close}
	if !ev.Close || len(ev.Data) > 0 || ev.Event != "" {
		var more sse.Fault
		f.Bytes, more = sse.AppendEvent(make([]byte, 0, len(ev.Data)+len(ev.ID)+len(ev.Event)+32), &ev)
		fault |= more
		if open {
			f.Bytes, f.NeedsID = f.Bytes[:len(f.Bytes)-1], true
		}
	}
	if fault != 0 && r.metrics.Faults != nil {
		for _, reason := range fault.Reasons() {
			r.metrics.Faults.WithLabelValues(reason).Inc()
		}
	}
	return f
}

// ReplayPage reads one page of the history of cur's channels after cur's
// positions: about count messages per channel. The stream writes each
// message (Encode) through cur (Advance, or AppendWire), which moves cur
// on, and reads again while Page.More. Page.Next is not for the stream.
func (r *Registry) ReplayPage(ctx context.Context, cur *Cursor, count int64) (Page, error) {
	if r.perChannel == nil {
		return r.src.ReplayPage(ctx, cur.channels, cur.last, count)
	}
	channels, after := cur.replayFrom()
	if len(channels) == 0 {
		return Page{}, nil
	}
	return r.perChannel.ReplayChannels(ctx, channels, after, count)
}

// Disconnected is called as soon as the Redis subscription is lost, before
// anything read on a new connection is delivered: from then on live
// messages are held, so that the catch-up starts from the last event
// delivered before the gap and nothing newer overtakes it.
func (r *Registry) Disconnected() {
	r.deliverMu.Lock()
	r.disconnects++
	r.holdLocked()
	r.deliverMu.Unlock()
}

// holdLocked holds live messages until a catch-up, which starts after the
// last message delivered before the first of the outages it covers.
func (r *Registry) holdLocked() {
	if !r.holding {
		r.holding = true
		r.holdAfter = r.lastSeq.Load()
	}
}

// Reconnected catches up the resumable channels after the Redis
// subscription was lost and re-established: what was published in the gap
// is read back from history and delivered before any newer live message.
// Calls may overlap (the connection can drop again during a catch-up): live
// messages are held back until a catch-up ends with no newer disconnect.
func (r *Registry) Reconnected(ctx context.Context) {
	if r.perChannel != nil {
		r.reconnectedPerChannel(ctx)
		return
	}
	r.deliverMu.Lock()
	r.holdLocked()
	after, gen := r.holdAfter, r.disconnects
	r.deliverMu.Unlock()

	var names []string
	r.mu.RLock()
	for name, c := range r.channels {
		if c.history {
			names = append(names, name)
		}
	}
	r.mu.RUnlock()

	var missed []Message
	var truncated bool
	var err error
	if len(names) > 0 && after > 0 {
		missed, truncated, err = r.src.Replay(ctx, names, after)
		if err != nil {
			r.logger.Error("catch-up after reconnect failed: events may be lost",
				zap.Strings("channels", names), zap.Error(err))
		}
	}
	r.deliverMu.Lock()
	if truncated || err != nil {
		f := MissedFrame(after)
		for _, name := range names {
			r.fanOutFrame(name, f)
		}
	}
	r.missed = append(r.missed, missed...)
	if r.disconnects == gen {
		r.flushLocked()
		r.holding = false
	}
	r.deliverMu.Unlock()
	if len(missed) > 0 {
		r.logger.Info("caught up after reconnect",
			zap.Int("events", len(missed)), zap.Strings("channels", names))
	}
}

// flushLocked ends the catch-ups: it merges what they read back with the
// live messages held back meanwhile in sequence order, which streams rely
// on (they skip a number lower than one they sent). So a read-back message
// goes out before every live one published after it, even across two
// outages, and a live message of a channel that was not read back is not
// skipped for having a lower number than a read-back one. A live message
// without a number goes out after what was read back below the next
// numbered live message. deliverLocked skips the duplicates.
func (r *Registry) flushLocked() {
	missed := r.missed
	slices.SortStableFunc(missed, func(a, b Message) int { return cmp.Compare(a.Seq, b.Seq) })
	bounds := make([]uint64, len(r.pending)) // number of the next numbered live message
	bound := uint64(math.MaxUint64)
	for i := len(r.pending) - 1; i >= 0; i-- {
		if seq := r.pending[i].Seq; seq != 0 {
			bound = seq
		}
		bounds[i] = bound
	}
	i := 0
	for j, m := range r.pending {
		for ; i < len(missed) && missed[i].Seq < bounds[j]; i++ {
			r.deliverLocked(missed[i])
		}
		r.deliverLocked(m)
	}
	for ; i < len(missed); i++ {
		r.deliverLocked(missed[i])
	}
	r.missed, r.pending = nil, nil
}

// reconnectedPerChannel is Reconnected with ids per channel: each
// resumable channel is caught up from its own head. A channel whose head
// was never known (Redis failed as it was subscribed) cannot be caught up:
// its streams are told they may have missed events, and its head is read.
func (r *Registry) reconnectedPerChannel(ctx context.Context) {
	start := time.Now()
	names := r.resumableChannels()
	r.deliverMu.Lock()
	r.holdLocked()
	gen := r.disconnects
	cu := r.planCatchUpLocked(names)
	r.deliverMu.Unlock()

	r.readBack(ctx, &cu, "catch-up after reconnect failed: events may be lost")

	r.deliverMu.Lock()
	r.tellMissedLocked(&cu)
	r.missed = append(r.missed, cu.missed...)
	if r.disconnects == gen {
		r.flushPerChannelLocked()
		r.holding = false
	}
	r.deliverMu.Unlock()
	if len(cu.missed) > 0 {
		r.logger.Info("caught up after reconnect", zap.Int("events", len(cu.missed)),
			zap.Int("channels", len(cu.known)), zap.Duration("took", time.Since(start)))
	}
}

// resumableChannels returns the channels that streams resume on and that
// are subscribed. A channel still being subscribed reads its head once it
// is: its streams start there, nothing to catch up.
func (r *Registry) resumableChannels() []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	var names []string
	for name, c := range r.channels {
		if c.resumable() {
			names = append(names, name)
		}
	}
	return names
}

// flushPerChannelLocked ends the catch-ups with ids per channel: per
// channel, what was read back goes out before what arrived live meanwhile,
// unless the channel is held (routeLocked); deliverLocked skips what both
// hold.
func (r *Registry) flushPerChannelLocked() {
	slices.SortStableFunc(r.missed, func(a, b Message) int { return cmp.Compare(a.Seq, b.Seq) })
	for _, m := range r.missed {
		r.routeLocked(m, true)
	}
	for _, m := range r.pending {
		r.routeLocked(m, false)
	}
	r.missed, r.pending = nil, nil
}

// catchUp is one catch-up of channels with ids per channel: the channels
// caught up from their heads, those whose head is unknown, and what was
// read for them.
type catchUp struct {
	known   []string
	after   []uint64 // the heads of known
	unknown []string // told they may have missed events; their heads are read

	missed     []Message // read back for known
	incomplete bool      // missed may lack some: trimmed, or the read failed
	heads      []uint64  // of unknown, unless headsErr
	headsErr   error
}

// planCatchUpLocked sorts channels by whether their head is known. It
// runs under deliverMu.
func (r *Registry) planCatchUpLocked(channels []string) catchUp {
	var cu catchUp
	for _, name := range channels {
		if h, ok := r.heads[name]; ok {
			cu.known = append(cu.known, name)
			cu.after = append(cu.after, h)
		} else {
			cu.unknown = append(cu.unknown, name)
		}
	}
	return cu
}

// readBack reads from Redis, holding no lock, what cu's known channels
// missed and where its unknown ones stand. failMsg is the error logged
// when the history cannot be read.
func (r *Registry) readBack(ctx context.Context, cu *catchUp, failMsg string) {
	if len(cu.known) > 0 {
		var truncated bool
		var err error
		cu.missed, truncated, err = r.perChannel.ReplayChannelsAll(ctx, cu.known, cu.after)
		if err != nil {
			r.logger.Error(failMsg, zap.Strings("channels", cu.known), zap.Error(err))
		}
		cu.incomplete = truncated || err != nil
	}
	if len(cu.unknown) > 0 {
		cu.heads, cu.headsErr = r.perChannel.Heads(ctx, cu.unknown)
		r.logger.Warn("channels subscribed while Redis failed cannot be caught up: their streams are told they may have missed events",
			zap.Strings("channels", cu.unknown), zap.NamedError("read_error", cu.headsErr))
	}
}

// tellMissedLocked sends the missed event to the streams of each channel
// of cu that may have lost events, and records the heads read for the
// unknown ones. It runs under deliverMu, before what was read back is
// delivered.
func (r *Registry) tellMissedLocked(cu *catchUp) {
	if cu.incomplete {
		for i, name := range cu.known {
			r.fanOutFrame(name, missedChannelFrame(name, cu.after[i]))
		}
	}
	for i, name := range cu.unknown {
		r.fanOutFrame(name, missedChannelFrame(name, 0))
		if cu.headsErr == nil {
			r.raiseHeadLocked(name, cu.heads[i])
		}
	}
}

// raiseHeadLocked records head as channel's newest id unless a newer one is
// known. It runs under deliverMu.
func (r *Registry) raiseHeadLocked(channel string, head uint64) {
	if h, ok := r.heads[channel]; !ok || head > h {
		r.heads[channel] = head
	}
}

// fanOutFrame queues the same frame on every stream of channel.
func (r *Registry) fanOutFrame(channel string, f *Frame) {
	r.fanOut(channel, false, func(sse.Format, bool) *Frame { return f })
}

// missedChannelFrame tells the streams of channel that events after the
// given position on it may be lost (0: unknown). It carries no id.
func missedChannelFrame(channel string, after uint64) *Frame {
	data, _ := json.Marshal(struct {
		After   string `json:"after"`
		Channel string `json:"channel"`
	}{strconv.FormatUint(after, 10), channel})
	ev := sse.Event{Event: MissedEvent, Data: data}
	b, _ := sse.AppendEvent(nil, &ev)
	return &Frame{Bytes: b}
}

// MissedFrameAfter is the event telling a client that resumed from id that
// it may have missed events. It carries no id, so the client's
// Last-Event-ID stays put.
func MissedFrameAfter(id EventID) *Frame {
	data, _ := json.Marshal(struct {
		After string `json:"after"`
	}{id.String()})
	ev := sse.Event{Event: MissedEvent, Data: data}
	b, _ := sse.AppendEvent(nil, &ev)
	return &Frame{Bytes: b}
}

// MissedFrame is the event telling a client that events after the given id
// may be lost. It carries no id, so the client's Last-Event-ID stays put.
func MissedFrame(after uint64) *Frame {
	ev := sse.Event{
		Event: MissedEvent,
		Data:  []byte(`{"after":"` + strconv.FormatUint(after, 10) + `"}`),
	}
	b, _ := sse.AppendEvent(nil, &ev)
	return &Frame{Bytes: b}
}

// Close ends every stream and stops subscribing.
func (r *Registry) Close() {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return
	}
	r.closed = true
	var all []*Subscriber
	for _, c := range r.channels {
		all = append(all, *c.subs.Load()...)
	}
	r.mu.Unlock()
	close(r.done)
	r.wg.Wait()
	for _, s := range all {
		s.End(ReasonShutdown)
	}
}

// Stats is a snapshot for the admin API and tests.
type Stats struct {
	Channels    int
	Subscribers map[string]int
}

// Snapshot returns the channels with their subscriber counts.
func (r *Registry) Snapshot() Stats {
	r.mu.RLock()
	defer r.mu.RUnlock()
	st := Stats{Channels: len(r.channels), Subscribers: make(map[string]int, len(r.channels))}
	for name, c := range r.channels {
		st.Subscribers[name] = c.refs
	}
	return st
}

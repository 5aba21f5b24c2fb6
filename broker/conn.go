package broker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// The subscription connection is driven by two goroutines:
//
//   - the reader dials, then loops on Receive: it hands messages to the
//     Handler and matches every other reply (subscribe/unsubscribe
//     confirmations, pongs, error replies) against inflight, the replies
//     the connection owes in the order the commands were written. It also
//     detects outages and replaces the connection. Beside it, for each
//     connection, the watchdog pings a silent connection and kills one that
//     stays silent, and the probe (Sentinel, Cluster) kills one that no
//     longer receives what is published.
//   - the writer writes the commands queued in pending, one at a time, once
//     the reader has dialed, so that neither Subscribe, Unsubscribe nor the
//     reader ever blocks on a socket write.
//
// Redis answers the commands of one connection in order, so matching replies
// against a FIFO is exact: SUBSCRIBE c / UNSUBSCRIBE c / SUBSCRIBE c get three
// replies in that order, and an error reply belongs to the oldest command
// not yet answered. A reply that does not match means the reader lost its
// place (or go-redis silently replaced the connection underneath): it is
// treated as an outage and the connection rebuilt from scratch.
//
// go-redis's own reconnect (it redials and resubscribes after an error)
// is never relied upon: any error closes the PubSub, and a fresh one is
// made, so that every gap is seen and reported through HandleReconnect.

type kind uint8

const (
	kindSubscribe kind = iota + 1
	kindUnsubscribe
	kindPing
)

func (k kind) String() string {
	switch k {
	case kindSubscribe:
		return "SUBSCRIBE"
	case kindUnsubscribe:
		return "UNSUBSCRIBE"
	}
	return "PING"
}

// pingPayload marks the broker's PINGs: a pong carrying anything else means
// the reader is out of step with the reply stream.
const pingPayload = "caddy-sse"

// maxResubscribe bounds the channels of one SUBSCRIBE written on reconnect.
const maxResubscribe = 1000

// Reconnect backoff: doubling from minBackoff to maxBackoff, with jitter so
// that a fleet of instances does not reconnect in lockstep.
const (
	minBackoff = 100 * time.Millisecond
	maxBackoff = 5 * time.Second
)

// reloadTimeout bounds the reload of the function library after a reconnect.
const reloadTimeout = 5 * time.Second

// op is one command queued for the writer.
type op struct {
	kind     kind
	channels []string // the callers' names: the writer adds their twins
	bare     bool     // channels have no twin (the probe's)
	w        *waiter  // the Subscribe call waiting for it, if any
	barrier  uint64   // a ping whose pong, if it is the latest barrier, marks the connection up
}

// names are the Redis channels o covers: each channel and its twin, side
// by side, so that one command subscribes (or drops) both.
func (b *Broker) names(o op) []string {
	if o.bare {
		return o.channels
	}
	out := make([]string, 0, 2*len(o.channels))
	for _, c := range o.channels {
		out = append(out, c, b.twinOf(c))
	}
	return out
}

// slotGroups splits names into the commands that subscribe (or drop) them:
// one in all, except on a per-master connection of sharded mode, where
// SSUBSCRIBE takes channels of one slot only (a channel and its twin share
// one). The order is kept within each group, and groups come in the order
// of their first name.
func (b *Broker) slotGroups(names []string) [][]string {
	if b.outer == nil {
		return [][]string{names}
	}
	var groups [][]string
	at := make(map[int]int)
	for _, n := range names {
		slot := Slot(n)
		i, ok := at[slot]
		if !ok {
			i = len(groups)
			at[slot] = i
			groups = append(groups, nil)
		}
		groups[i] = append(groups[i], n)
	}
	return groups
}

// waiter is one Subscribe call waiting for its confirmations.
type waiter struct {
	channels  []string
	remaining int // confirmations still due; guarded by Broker.mu
	done      chan struct{}
	err       error // valid once done is closed
	once      sync.Once
}

func (w *waiter) finish(err error) {
	w.once.Do(func() {
		w.err = err
		close(w.done)
	})
}

// reply is one reply the connection owes.
type reply struct {
	kind    kind
	channel string // the Redis channel: a caller's, or its twin
	cmd     uint64 // the command it answers: an error reply ends all of them
	w       *waiter
	barrier uint64
}

// replyQueue is a FIFO of replies.
type replyQueue struct {
	items []reply
	head  int
}

func (q *replyQueue) push(r reply) { q.items = append(q.items, r) }

func (q *replyQueue) peek() (reply, bool) {
	if q.head == len(q.items) {
		return reply{}, false
	}
	return q.items[q.head], true
}

func (q *replyQueue) pop() {
	q.items[q.head] = reply{} // drop references for the GC
	q.head++
	switch {
	case q.head == len(q.items):
		q.items, q.head = q.items[:0], 0
	case q.head > 1024 && q.head > len(q.items)/2:
		n := copy(q.items, q.items[q.head:])
		clear(q.items[n:])
		q.items, q.head = q.items[:n], 0
	}
}

// subConnKey marks the context of the subscription connection's
// operations, so that the dialer can tell its connection from the pool's.
type subConnKey struct{}

// countingDialer wraps ro's dialer (or go-redis's default one) so that the
// subscription connection counts the bytes it reads: the watchdog then
// sees progress while a large message is being read, and never mistakes a
// slow transfer for a dead connection.
func (b *Broker) countingDialer(ro redis.UniversalOptions) func(context.Context, string, string) (net.Conn, error) {
	dial := ro.Dialer
	if dial == nil {
		// go-redis's own default, with its default timeout made explicit:
		// the TLS dial does not honour the context.
		dial = redis.NewDialer(&redis.Options{
			DialTimeout: cmp.Or(ro.DialTimeout, 5*time.Second),
			TLSConfig:   ro.TLSConfig,
		})
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil || ctx.Value(subConnKey{}) == nil {
			return c, err
		}
		return &countingConn{Conn: c, n: &b.rx}, nil
	}
}

// clusterSubClient is the client of the subscription connection in a
// cluster. It dials whichever master serves the {sse} slot at the time:
// every resumable event is published there, so they reach the connection
// in the order of their ids without crossing the cluster bus. (Through the
// bus, events of a master that just handed the slot over can arrive after
// those of its successor, and a lower id after a higher one is taken for a
// duplicate.) Plain PUBLISHes reach it from any node, as anywhere.
func (b *Broker) clusterSubClient(ro redis.UniversalOptions) *redis.Client {
	o := ro.Simple()
	dial := ro.Dialer
	o.Dialer = func(ctx context.Context, network, _ string) (net.Conn, error) {
		m, err := b.cluster.MasterForKey(ctx, ClusterSeqKey)
		if err != nil {
			return nil, err
		}
		addr := m.Options().Addr
		b.subAddr.Store(&addr)
		return dial(ctx, network, addr)
	}
	return redis.NewClient(o)
}

// followSlot reports why ps must move, in a cluster, when the master it is
// on no longer serves the {sse} slot (a failover or resharding moved it),
// and asks for a fresh view of the slots for the next call: go-redis would
// otherwise only notice a move on a MOVED reply or after a minute.
func (b *Broker) followSlot() error {
	defer b.cluster.ReloadState(b.ctx)
	on := b.subAddr.Load()
	m, err := b.cluster.MasterForKey(b.ctx, ClusterSeqKey)
	if err != nil || on == nil || m.Options().Addr == *on {
		return nil
	}
	return fmt.Errorf("the history slot moved from %s to %s: following it", *on, m.Options().Addr)
}

// countingConn counts the bytes read from a connection.
type countingConn struct {
	net.Conn
	n *atomic.Uint64
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.n.Add(uint64(n))
	return n, err
}

// dropQueuesLocked forgets every queued and owed command and returns the
// Subscribe calls waiting on them, for the caller to finish outside the lock.
func (b *Broker) dropQueuesLocked() []*waiter {
	var ws []*waiter
	add := func(w *waiter) {
		if w != nil && (len(ws) == 0 || ws[len(ws)-1] != w) {
			ws = append(ws, w)
		}
	}
	for _, o := range b.pending {
		add(o.w)
	}
	for _, r := range b.inflight.items[b.inflight.head:] {
		add(r.w)
	}
	b.pending = nil
	b.inflight = replyQueue{}
	return ws
}

// queue adds an op for the current connection, if there is one.
func (b *Broker) queue(o op) {
	b.mu.Lock()
	if b.ps != nil {
		b.pending = append(b.pending, o)
	}
	b.mu.Unlock()
	b.kick()
}

// writeLoop is the writer goroutine. It ends with the broker.
func (b *Broker) writeLoop() {
	for {
		select {
		case <-b.ctx.Done():
			return
		case <-b.wake:
		}
		for b.writeOne() {
		}
	}
}

// writeOne writes the oldest pending op; false when there is none.
func (b *Broker) writeOne() bool {
	ps, o, groups, ok := b.nextOp()
	if !ok {
		return false
	}
	if err := b.write(ps, o, groups); err != nil {
		// go-redis has dropped the connection and may already have dialed
		// a new one behind our back; closing the PubSub makes the reader
		// fail and rebuild everything, so the gap is seen.
		b.kill(ps, fmt.Errorf("write %s: %w", o.kind, err))
	}
	return true
}

// nextOp takes the oldest pending op, if the connection may be written,
// with the channel groups of its commands. Its replies are recorded under
// the same lock that takes it from pending, before it is written, so
// inflight is in the order of the wire.
func (b *Broker) nextOp() (ps *redis.PubSub, o op, groups [][]string, ok bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.pending) == 0 || b.ps == nil || !b.ready {
		return nil, op{}, nil, false
	}
	ps, o = b.ps, b.pending[0]
	b.pending[0] = op{}
	b.pending = b.pending[1:]
	if len(b.pending) == 0 {
		b.pending = nil
	}
	if o.kind == kindPing {
		b.nextCmd++
		b.inflight.push(reply{kind: kindPing, cmd: b.nextCmd, barrier: o.barrier})
		return ps, o, nil, true
	}
	groups = b.slotGroups(b.names(o))
	for _, g := range groups {
		b.nextCmd++
		for _, c := range g {
			b.inflight.push(reply{kind: o.kind, channel: c, cmd: b.nextCmd, w: o.w})
		}
	}
	return ps, o, groups, true
}

// write writes o on ps: one command per group of channels.
func (b *Broker) write(ps *redis.PubSub, o op, groups [][]string) error {
	if o.kind == kindPing {
		return ps.Ping(b.psCtx, pingPayload)
	}
	for _, g := range groups {
		var err error
		switch {
		case o.kind == kindSubscribe && b.outer != nil:
			err = ps.SSubscribe(b.psCtx, g...)
		case o.kind == kindSubscribe:
			err = ps.Subscribe(b.psCtx, g...)
		case b.outer != nil:
			err = ps.SUnsubscribe(b.psCtx, g...)
		default:
			err = ps.Unsubscribe(b.psCtx, g...)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// readLoop is the reader goroutine: receive on ps until the connection
// fails, back off, connect again, and so on until Close.
func (b *Broker) readLoop(ps *redis.PubSub) {
	attempt := 0
	for ; ps != nil; ps = b.connect() {
		err := b.receive(ps)
		if b.ctx.Err() != nil {
			_ = ps.Close()
			return
		}
		wasUp, first := b.down(ps, err)
		if wasUp {
			attempt = 0
		}
		if first {
			b.h.HandleDisconnect()
		}
		if !b.sleep(backoff(attempt)) {
			return
		}
		attempt++
	}
}

// barrierLocked is a new barrier PING op, superseding any earlier one.
func (b *Broker) barrierLocked() op {
	b.barrier++
	return op{kind: kindPing, barrier: b.barrier}
}

// connect installs a fresh PubSub and queues the resubscription of every
// channel followed by a barrier PING: Redis answers in order, so the
// barrier's pong means every channel is confirmed. The reader dials.
func (b *Broker) connect() *redis.PubSub {
	var ps *redis.PubSub
	if b.sub != nil {
		ps = b.sub.Subscribe(b.psCtx)
	} else {
		ps = b.client.Subscribe(b.psCtx)
	}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		_ = ps.Close()
		return nil
	}
	b.ps, b.ready = ps, false
	if b.probeChan != "" && !b.probeOff.Load() {
		b.pending = append(b.pending, op{kind: kindSubscribe, channels: []string{b.probeChan}, bare: true})
	}
	chans := make([]string, 0, len(b.channels))
	for c := range b.channels {
		chans = append(chans, c)
	}
	for len(chans) > 0 {
		n := min(len(chans), maxResubscribe)
		b.pending = append(b.pending, op{kind: kindSubscribe, channels: chans[:n:n]})
		chans = chans[n:]
	}
	b.pending = append(b.pending, b.barrierLocked())
	b.mu.Unlock()
	b.kick()
	return ps
}

// receive dials ps, then reads it until it fails, and returns why.
func (b *Broker) receive(ps *redis.PubSub) error {
	if err := b.handshake(ps); err != nil {
		return err
	}
	stop := make(chan struct{})
	defer close(stop)
	b.start(func() { b.watch(ps, stop) })
	if b.probeChan != "" || b.cluster != nil {
		b.start(func() { b.probe(ps, stop) })
	}
	for {
		// No read deadline: a deadline that fires in the middle of a large
		// message leaves go-redis's reader mid-frame, and the rest of the
		// payload would be parsed as replies. The watchdog detects silence.
		v, err := ps.Receive(b.psCtx)
		if err != nil {
			var rerr redis.Error
			if b.ctx.Err() != nil || !errors.As(err, &rerr) {
				return err
			}
			err = b.refused(rerr)
		} else {
			err = b.dispatch(v)
		}
		if err != nil {
			return err
		}
	}
}

// handshake dials ps with a PING whose pong is the first reply owed,
// before the writer may write anything: a dial or handshake failure (wrong
// password, LOADING) then surfaces as the connection's failure, never as
// an error reply to a queued SUBSCRIBE.
func (b *Broker) handshake(ps *redis.PubSub) error {
	b.mu.Lock()
	b.nextCmd++
	b.inflight.push(reply{kind: kindPing, cmd: b.nextCmd})
	b.mu.Unlock()
	if err := ps.Ping(b.psCtx, pingPayload); err != nil {
		return err
	}
	b.mu.Lock()
	if b.ps == ps {
		b.ready = true
	}
	b.mu.Unlock()
	b.kick()
	return nil
}

// dispatch handles one thing the connection read: a message, or the reply
// to a command. An error means the connection cannot be trusted.
func (b *Broker) dispatch(v any) error {
	switch v := v.(type) {
	case *redis.Message:
		if v.Channel == b.probeChan && b.probeChan != "" {
			b.probeReceived(v.Payload)
			return nil
		}
		inc(b.m.Received)
		b.message(v.Channel, v.Payload)
	case *redis.Subscription:
		if err := b.confirmed(v); err != nil {
			return err
		}
		if b.outer != nil {
			b.mu.Lock()
			lost := b.lostPending
			b.lostPending = nil
			b.mu.Unlock()
			b.handLost(lost)
		}
	case *redis.Pong:
		return b.ponged(v)
	default:
		return fmt.Errorf("unexpected %T on the subscription connection", v)
	}
	return nil
}

// message hands over what arrived on a Redis channel. Only a twin's
// message carries an id; a plain one never does, whatever its bytes.
func (b *Broker) message(channel, payload string) {
	if c, ok := b.channelOfTwin(channel); ok {
		seq, body, ok := unframe(payload)
		if !ok {
			b.reject(b.rejBad, rejectBad, "dropped a message on a resumable channel that is not an sse_publish frame", c, payload)
			return
		}
		b.h.HandleMessage(Message{Channel: c, Payload: []byte(body), Seq: seq})
		return
	}
	if strings.HasPrefix(payload, FramePrefix) {
		b.reject(b.rejForged, rejectForged, "a plain PUBLISH carries the resumable frame marker: delivered as plain data, without an id", channel, payload)
	}
	b.h.HandleMessage(Message{Channel: channel, Payload: []byte(payload)})
}

// rejectLogEvery is the least time between two log lines about rejected
// messages: a publisher relaying forged frames must not flood the log.
const rejectLogEvery = 10 * time.Second

// rejectLogPrefix is how much of a rejected payload the log shows: enough
// to find its source, not its content.
const rejectLogPrefix = 32

// reject counts a rejected message and logs it, rate-limited.
func (b *Broker) reject(c prometheus.Counter, reason, msg, channel, payload string) {
	inc(c)
	ok, suppressed := b.rejectLog.allow(time.Now())
	if !ok {
		return
	}
	b.log.Warn(msg,
		zap.String("reason", reason),
		zap.String("channel", channel),
		zap.String("payload", fmt.Sprintf("%q", payload[:min(len(payload), rejectLogPrefix)])),
		zap.Int("bytes", len(payload)),
		zap.Int("suppressed", suppressed))
}

// rejectLimiter lets one line through per rejectLogEvery and counts the
// others. The reader goroutine is its only user.
type rejectLimiter struct {
	last       time.Time
	suppressed int
}

// allow reports whether a line may be logged at now and, if so, how many
// were suppressed since the last one.
func (l *rejectLimiter) allow(now time.Time) (ok bool, suppressed int) {
	if !l.last.IsZero() && now.Sub(l.last) < rejectLogEvery {
		l.suppressed++
		return false, 0
	}
	suppressed = l.suppressed
	l.last, l.suppressed = now, 0
	return true, suppressed
}

// watch is the health check of one connection: after an interval without
// a byte read it sends a PING, and after a further interval still without
// one it kills the connection. It ends with stop.
func (b *Broker) watch(ps *redis.PubSub, stop <-chan struct{}) {
	t := time.NewTicker(b.interval)
	defer t.Stop()
	seen, pinged := b.rx.Load(), false
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		switch n := b.rx.Load(); {
		case n != seen:
			seen, pinged = n, false
		case !pinged:
			b.queue(op{kind: kindPing})
			pinged = true
		default:
			b.kill(ps, fmt.Errorf("no reply to PING within %s", b.interval))
			return
		}
	}
}

// probe checks end to end that ps receives what is published now: every
// period it publishes a number on the broker's own channel through the
// command client (which follows a Sentinel failover or the cluster's
// topology), and kills ps when that number has not arrived two periods
// later. A publish that fails proves nothing either way (Redis is down,
// which the watchdog sees) and is tried again at the next period. In a
// cluster it also moves ps after the {sse} slot (see followSlot), even
// with the probe off.
func (b *Broker) probe(ps *redis.PubSub, stop <-chan struct{}) {
	every := b.probeEvery
	if every <= 0 {
		every = DefaultProbe
	}
	t := time.NewTicker(every)
	defer t.Stop()
	var out probeOut
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		probing := b.probeChan != "" && !b.probeOff.Load()
		if probing && !out.arrived(b.probeSeen.Load()) {
			if out.late < 2 {
				continue
			}
			b.kill(ps, fmt.Errorf("a probe published %s ago was not received: the connection no longer gets what is published (a failover?)", 2*every))
			return
		}
		if !b.upOn(ps) {
			continue // the probe channel is not confirmed yet
		}
		if b.cluster != nil {
			if err := b.followSlot(); err != nil {
				b.kill(ps, err)
				return
			}
		}
		if probing {
			if n := b.publishProbe(every); n != 0 {
				out = probeOut{due: n}
			}
		}
	}
}

// probeOut is the probe a connection waits for.
type probeOut struct {
	due  uint64 // the probe that must arrive, 0 if none is out
	late int    // periods it has been out
}

// arrived reports whether the probe out, if any, has arrived (seen is the
// last one received); one that has not is a period later.
func (p *probeOut) arrived(seen uint64) bool {
	if p.due == 0 || seen >= p.due {
		p.due = 0
		return true
	}
	p.late++
	return false
}

// probeReceived notes a probe number read on the probe's channel.
func (b *Broker) probeReceived(payload string) {
	if n, err := strconv.ParseUint(payload, 10, 64); err == nil && n > b.probeSeen.Load() {
		b.probeSeen.Store(n)
	}
}

// upOn reports whether ps is the connection and is up.
func (b *Broker) upOn(ps *redis.PubSub) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.ps == ps && b.up
}

// publishProbe publishes the next probe number, within timeout, and
// returns it; 0 if it was not published. A Redis that refuses it (an ACL)
// turns the probe off.
func (b *Broker) publishProbe(timeout time.Duration) uint64 {
	n := b.probeSent.Add(1)
	ctx, cancel := context.WithTimeout(b.ctx, timeout)
	err := b.client.Publish(ctx, b.probeChan, strconv.FormatUint(n, 10)).Err()
	cancel()
	var rerr redis.Error
	switch {
	case err == nil:
		return n
	case errors.As(err, &rerr) && strings.HasPrefix(rerr.Error(), "NOPERM"):
		b.log.Warn("redis refuses the subscription probe; running without it",
			zap.String("channel", b.probeChan), zap.Error(err))
		b.probeOff.Store(true)
	}
	return 0
}

// kill closes ps, if it is still the connection, for reason: the reader's
// Receive fails at once, and reason is what the outage reports rather than
// the closed connection the reader sees.
func (b *Broker) kill(ps *redis.PubSub, reason error) {
	b.mu.Lock()
	if b.ps == ps && b.killed == nil {
		b.killed = reason
	}
	b.mu.Unlock()
	_ = ps.Close()
}

// confirmed matches a subscribe/unsubscribe confirmation with the oldest
// owed reply and releases its Subscribe call when it was the last due.
func (b *Broker) confirmed(s *redis.Subscription) error {
	var k kind
	switch s.Kind {
	case "subscribe", "ssubscribe":
		k = kindSubscribe
	case "unsubscribe", "sunsubscribe":
		k = kindUnsubscribe
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	r, ok := b.inflight.peek()
	if !ok || k == 0 || r.kind != k || r.channel != s.Channel {
		if b.outer != nil && s.Kind == "sunsubscribe" {
			// Not an answer: the node gave the channel's slot away
			// (resharding, or it became a replica) and dropped its
			// subscribers.
			b.slotLostLocked(s.Channel)
			return nil
		}
		return fmt.Errorf("unexpected %s confirmation for channel %q: replies out of step", s.Kind, s.Channel)
	}
	b.inflight.pop()
	if r.w != nil {
		r.w.remaining--
		if r.w.remaining == 0 {
			r.w.finish(nil)
		}
	}
	return nil
}

// ponged matches a pong; the barrier's pong marks the connection up.
func (b *Broker) ponged(p *redis.Pong) error {
	b.mu.Lock()
	r, ok := b.inflight.peek()
	if !ok || r.kind != kindPing || p.Payload != pingPayload {
		b.mu.Unlock()
		return fmt.Errorf("unexpected pong %q: replies out of step", p.Payload)
	}
	b.inflight.pop()
	if r.barrier == 0 || r.barrier != b.barrier || b.up {
		b.mu.Unlock()
		return nil
	}
	b.up, b.upAt = true, time.Now()
	reconnected, outage := b.outage, time.Since(b.downAt)
	b.outage = false
	n := len(b.channels)
	b.mu.Unlock()

	setGauge(b.m.Connected, 1)
	if !reconnected {
		b.log.Debug("redis subscription connection up", zap.Int("channels", n))
		return nil
	}
	inc(b.m.Reconnects)
	b.log.Info("redis subscription connection re-established",
		zap.Duration("outage", outage), zap.Int("channels", n))
	b.start(b.afterReconnect)
	return nil
}

// refused handles an error reply: it answers the oldest command owed. A
// refused SUBSCRIBE (an ACL forbidding a channel or its twin) drops its
// channels and fails its Subscribe call; a refused resubscription batch is
// retried one channel at a time so that only the forbidden channels are
// dropped, and one bad channel never keeps the whole connection down.
// Anything else means the connection cannot be trusted.
func (b *Broker) refused(rerr redis.Error) error {
	b.mu.Lock()
	r, ok := b.inflight.peek()
	if ok && b.outer != nil && r.kind != kindPing && isMoved(rerr) {
		b.movedUnlock(r.cmd, rerr)
		return nil
	}
	if !ok || r.kind != kindSubscribe {
		b.mu.Unlock()
		return fmt.Errorf("redis refused a command on the subscription connection: %w", rerr)
	}
	w := r.w
	chans := b.popCommandLocked(r.cmd)
	if w == nil && len(chans) > 1 {
		for _, c := range chans {
			b.pending = append(b.pending, op{kind: kindSubscribe, channels: []string{c}, bare: c == b.probeChan})
		}
		if !b.up {
			b.pending = append(b.pending, b.barrierLocked())
		}
		b.mu.Unlock()
		b.kick()
		return nil
	}
	for _, c := range chans {
		delete(b.channels, c)
		if c == b.probeChan {
			// An ACL that forbids the probe's channel: do without it rather
			// than take every probe for a lost connection.
			b.probeOff.Store(true)
		}
	}
	setGauge(b.m.Channels, float64(len(b.channels)))
	b.mu.Unlock()

	why := "redis refused a subscription (an ACL must allow each channel and " + ResumableChannelPrefix + "<channel>)"
	if b.sharded {
		why = "redis refused a subscription (an ACL must allow each channel and its twin, such as sse:r{<channel>})"
	}
	b.log.Warn(why,
		zap.Strings("channels", chans), zap.Error(rerr))
	if w != nil {
		w.finish(fmt.Errorf("subscribe %q: %w", chans, rerr))
	}
	return nil
}

// popCommandLocked drops the replies owed for the command cmd, the oldest
// one owed, and returns its channels: the callers' names.
func (b *Broker) popCommandLocked(cmd uint64) []string {
	var chans []string
	for r, ok := b.inflight.peek(); ok && r.cmd == cmd; r, ok = b.inflight.peek() {
		// A twin and its channel come side by side; callers never name a
		// twin (reserved), so taking the channel back is exact.
		c := r.channel
		if ch, twin := b.channelOfTwin(c); twin {
			c = ch
		}
		if len(chans) == 0 || chans[len(chans)-1] != c {
			chans = append(chans, c)
		}
		b.inflight.pop()
	}
	return chans
}

// down tears ps down after it failed with err and reports whether it had
// been up and whether this starts an outage. The warning is logged once per
// outage, not once per retry.
func (b *Broker) down(ps *redis.PubSub, err error) (wasUp, first bool) {
	b.mu.Lock()
	wasUp = b.up
	b.up, b.ready = false, false
	if b.ps == ps {
		b.ps = nil
	}
	if b.killed != nil {
		err, b.killed = b.killed, nil
	}
	failed := b.dropQueuesLocked()
	first = !b.outage
	if first {
		b.outage, b.downAt = true, time.Now()
		b.refusal = ""
	}
	// Redis answering with an error (WRONGPASS after a password rotation,
	// NOAUTH, an ACL) is not an outage that passes by itself: an operator
	// must see the reason at warn, once per reason, even when the outage
	// began as a plain disconnect.
	refusal := refusalOf(err)
	newRefusal := refusal != "" && refusal != b.refusal
	if newRefusal {
		b.refusal = refusal
	}
	n := len(b.channels)
	b.mu.Unlock()

	_ = ps.Close()
	for _, w := range failed {
		w.finish(fmt.Errorf("subscribe %q: %w", w.channels, ErrDown))
	}
	if b.cluster != nil {
		// The next attempt dials a node at random among those go-redis
		// knows: make it forget a failed one.
		b.cluster.ReloadState(b.ctx)
	}
	setGauge(b.m.Connected, 0)
	switch {
	case !first && newRefusal:
		b.log.Warn("redis refuses the subscription connection; retrying",
			zap.Strings("redis", b.addrs), zap.Error(err), zap.Int("channels", n))
	case !first:
		b.log.Debug("redis reconnect attempt failed", zap.Error(err))
	case wasUp:
		b.log.Warn("redis subscription connection lost; reconnecting",
			zap.Strings("redis", b.addrs), zap.Error(err), zap.Int("channels", n))
	default:
		b.log.Warn("cannot connect to redis; retrying",
			zap.Strings("redis", b.addrs), zap.Error(err), zap.Int("channels", n))
	}
	return wasUp, first
}

// refusalOf is the error reply Redis gave in err, "" if err is not one.
func refusalOf(err error) string {
	var rerr redis.Error
	if errors.As(err, &rerr) {
		return rerr.Error()
	}
	return ""
}

// afterReconnect runs in a goroutine of its own once a reconnect is confirmed:
// a Redis that restarted without persistence lost the function library, and
// the Handler must learn that messages were missed.
func (b *Broker) afterReconnect() {
	if b.cluster != nil {
		// A lost connection in a cluster often means a failed node: what
		// follows should not be routed to it.
		b.cluster.ReloadState(b.ctx)
	}
	b.reloadHistory()
	if b.presOn.Load() && b.ctx.Err() == nil {
		// Redis may have restarted without its data: the library and this
		// instance's fields go back at once, not at the next refresh.
		b.loadPresenceLibrary(b.ctx, false)
		b.presenceResync()
	}
	if b.ctx.Err() == nil {
		b.h.HandleReconnect()
	}
}

func (b *Broker) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-b.ctx.Done():
		return false
	}
}

// backoff is the delay before reconnect attempt n (from 0): 100 ms doubling
// to 5 s, each drawn between half and all of it.
func backoff(n int) time.Duration {
	d := maxBackoff
	if n < 6 {
		d = min(minBackoff<<n, maxBackoff)
	}
	return d/2 + rand.N(d/2+1)
}

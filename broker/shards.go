package broker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// In sharded mode the broker has no subscription connection of its own:
// each channel is subscribed (with its twin, SSUBSCRIBE) on a connection to
// the master that serves its slot, one connection per master. Each such
// connection is a Broker of its own (outer set), with the reader, writer,
// watchdog and reconnect logic of conn.go; the shardSet places channels on
// them and moves them when their slot moves:
//
//   - A node that gives a slot away (resharding, or a master demoted after
//     a failover) drops its shard subscribers with an SUNSUBSCRIBE they did
//     not ask for, and answers SSUBSCRIBE for a slot it does not serve with
//     MOVED. The connection hands such channels back (noteLost).
//   - Every period, and at once on such a notice, the follower reads the
//     cluster's slots (CLUSTER SHARDS) and moves every channel whose slot is
//     served elsewhere: a failover shows there once a replica took over,
//     while the connection to the dead master only sees errors.
//
// A move is an outage of those channels: the Handler is told (with a
// ChannelHandler, of those channels only) before they are subscribed on
// their new master, and again once they are, so that what was published in
// between is caught up from history; the loss of a connection likewise
// holds the channels on it until it is back, or they moved.
//
// go-redis's ClusterClient.SSubscribe is not used: its PubSub lives on one
// node, dialled for its first channel, and does not follow slots.

// errMoved reports a subscription a node refused with MOVED: the slot is
// served by another master.
var errMoved = errors.New("broker: the channel's slot is served by another master")

// shardSet is the sharded broker's per-master connections.
type shardSet struct {
	b     *Broker                // the sharded broker
	ro    redis.UniversalOptions // the cluster's options, for one node each
	every time.Duration          // how often the slots are read

	op sync.Mutex // orders subscribe and the follower's moves

	mu     sync.Mutex
	conns  map[string]*shardConn // by master address
	owner  map[string]string     // wanted channel -> address it is subscribed on, "" if not placed
	slots  slotMap
	readOK time.Time // when the slots were last read
	up     bool
	since  time.Time

	lostMu sync.Mutex
	lost   []lostChannel

	kick chan struct{}
}

// shardConn is the subscription connection to one master.
type shardConn struct {
	addr string
	b    *Broker
	// The channels held (HandleChannelsDown) while it is down, to release
	// when it is back or retired; guarded by shardSet.mu.
	down []string
}

type lostChannel struct {
	conn    *shardConn
	channel string
}

func newShardSet(b *Broker, ro redis.UniversalOptions, every time.Duration) *shardSet {
	if every <= 0 {
		every = DefaultProbe
	}
	ro.IsClusterMode = false
	ro.MasterName = ""
	return &shardSet{
		b:     b,
		ro:    ro,
		every: every,
		conns: make(map[string]*shardConn),
		owner: make(map[string]string),
		since: time.Now(),
		kick:  make(chan struct{}, 1),
	}
}

// close closes every connection, once the broker's goroutines (the
// follower among them) have ended. A Subscribe still running opens no new
// one.
func (s *shardSet) close() {
	s.mu.Lock()
	conns := s.conns
	s.conns = nil
	s.mu.Unlock()
	for _, c := range conns {
		_ = c.b.Close()
	}
}

// slotMap is the masters serving each slot, as CLUSTER SLOTS told.
type slotMap []slotRange

type slotRange struct {
	start, end int
	addr       string
}

func (m slotMap) addrOf(slot int) string {
	i, ok := slices.BinarySearchFunc(m, slot, func(r slotRange, slot int) int {
		switch {
		case r.end < slot:
			return -1
		case r.start > slot:
			return 1
		}
		return 0
	})
	if !ok {
		return ""
	}
	return m[i].addr
}

// readSlots reads the cluster's slots from a node (CLUSTER SHARDS) and
// keeps them.
func (s *shardSet) readSlots(ctx context.Context) error {
	shards, err := s.b.cluster.ClusterShards(ctx).Result()
	if err != nil {
		return fmt.Errorf("read the cluster's slots: %w", err)
	}
	var m slotMap
	for _, sh := range shards {
		addr := ""
		for _, n := range sh.Nodes {
			if n.Role == "master" && n.Health == "online" {
				port := cmp.Or(n.Port, n.TLSPort)
				if s.ro.TLSConfig != nil && n.TLSPort != 0 {
					port = n.TLSPort
				}
				addr = net.JoinHostPort(cmp.Or(n.IP, n.Endpoint), strconv.FormatInt(port, 10))
			}
		}
		if addr == "" {
			continue // its master failed and no replica took over yet
		}
		for _, r := range sh.Slots {
			m = append(m, slotRange{start: int(r.Start), end: int(r.End), addr: addr})
		}
	}
	slices.SortFunc(m, func(a, b slotRange) int { return cmp.Compare(a.start, b.start) })
	s.mu.Lock()
	s.slots, s.readOK = m, time.Now()
	s.mu.Unlock()
	return nil
}

// connLocked returns the connection to addr, dialled on first use.
func (s *shardSet) connLocked(addr string) (*shardConn, error) {
	if s.conns == nil {
		return nil, ErrClosed
	}
	if c := s.conns[addr]; c != nil {
		return c, nil
	}
	ro := s.ro
	ro.Addrs = []string{addr}
	c := &shardConn{addr: addr}
	_, err := build(Options{
		Redis:        &ro,
		Logger:       s.b.log.With(zap.String("shard", addr)),
		Metrics:      Metrics{Received: s.b.m.Received, Rejected: s.b.m.Rejected},
		HealthCheck:  s.b.interval,
		Probe:        -1,
		LibraryCheck: -1,
		Instance:     s.b.instance,
	}, shardHandler{s: s, c: c}, s.b) // sets c.b before it starts
	if err != nil {
		return nil, err
	}
	s.conns[addr] = c
	return c, nil
}

// subscribe places channels on the connections of their masters and
// subscribes them there, trying again where a slot moved meanwhile.
// Channels it cannot place now (the slots cannot be read) are placed by
// the follower, with a catch-up; it then returns ErrDown.
func (s *shardSet) subscribe(ctx context.Context, channels []string) error {
	s.op.Lock()
	defer s.op.Unlock()
	if s.b.ctx.Err() != nil {
		return ErrClosed
	}
	s.mu.Lock()
	for _, c := range channels {
		if _, ok := s.owner[c]; !ok {
			s.owner[c] = ""
		}
	}
	setGauge(s.b.m.Channels, float64(len(s.owner)))
	known := len(s.slots) > 0
	s.mu.Unlock()

	var firstErr error
	todo := channels
	for attempt := 0; len(todo) > 0 && attempt < 3; attempt++ {
		if attempt > 0 || !known {
			if err := s.readSlots(ctx); err != nil {
				firstErr = err
				break
			}
		}
		groups, err := s.place(todo)
		if err != nil {
			return err
		}
		moved, err := s.subscribeOn(ctx, groups)
		if err != nil && firstErr == nil {
			firstErr = err
		}
		todo = moved
	}
	if len(todo) > 0 || !s.placed(channels) {
		s.poke()
		if firstErr == nil || errors.Is(firstErr, errMoved) {
			firstErr = ErrDown
		}
		return fmt.Errorf("subscribe %q: %w", channels, errors.Join(ErrDown, firstErr))
	}
	return firstErr
}

// subscribeOn subscribes each group of channels on its connection, all at
// once, and returns the channels whose slot moved meanwhile and the first
// other error.
func (s *shardSet) subscribeOn(ctx context.Context, groups map[*shardConn][]string) (moved []string, firstErr error) {
	var mu sync.Mutex
	var wg sync.WaitGroup
	for c, chans := range groups {
		wg.Go(func() {
			err := c.b.Subscribe(ctx, chans...)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case errors.Is(err, errMoved):
				moved = append(moved, chans...)
			case err != nil && firstErr == nil:
				firstErr = err
			}
		})
	}
	wg.Wait()
	return moved, firstErr
}

// placed reports whether every one of channels is placed on a connection.
func (s *shardSet) placed(channels []string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range channels {
		if s.owner[c] == "" {
			return false
		}
	}
	return true
}

// place assigns channels to the connections of the masters of their slots
// (as last read), and returns them grouped by connection.
func (s *shardSet) place(channels []string) (map[*shardConn][]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	groups := make(map[*shardConn][]string)
	for _, ch := range channels {
		if _, wanted := s.owner[ch]; !wanted {
			continue
		}
		addr := s.slots.addrOf(Slot(ch))
		if addr == "" {
			s.owner[ch] = ""
			continue
		}
		c, err := s.connLocked(addr)
		if err != nil {
			return nil, err
		}
		if old := s.owner[ch]; old != "" && old != addr {
			if oc := s.conns[old]; oc != nil {
				oc.b.Unsubscribe(ch)
			}
		}
		s.owner[ch] = addr
		groups[c] = append(groups[c], ch)
	}
	return groups, nil
}

// unsubscribe drops channels from their connections without waiting.
func (s *shardSet) unsubscribe(channels []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, ch := range channels {
		addr, ok := s.owner[ch]
		if !ok {
			continue
		}
		delete(s.owner, ch)
		if c := s.conns[addr]; c != nil {
			c.b.Unsubscribe(ch)
		}
	}
	setGauge(s.b.m.Channels, float64(len(s.owner)))
}

// noteLost is told by the connection c that Redis dropped channels from it
// (their slot is served elsewhere now). It never blocks: the follower moves
// them.
func (s *shardSet) noteLost(c *shardConn, channels []string) {
	s.lostMu.Lock()
	for _, ch := range channels {
		s.lost = append(s.lost, lostChannel{conn: c, channel: ch})
	}
	s.lostMu.Unlock()
	s.poke()
}

func (s *shardSet) poke() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// follow is the follower goroutine: every period, or when poked, it reads
// the slots and moves the channels that are not where they belong. It ends
// with the broker.
func (s *shardSet) follow() {
	t := time.NewTicker(s.every)
	defer t.Stop()
	for {
		select {
		case <-s.b.ctx.Done():
			return
		case <-t.C:
		case <-s.kick:
		}
		s.tick()
	}
}

// tick is one round of the follower.
func (s *shardSet) tick() {
	ctx, cancel := context.WithTimeout(s.b.ctx, max(2*s.every, 5*time.Second))
	defer cancel()
	err := s.readSlots(ctx)
	if err != nil && s.b.ctx.Err() == nil {
		s.b.log.Debug("cannot read the cluster's slots", zap.Error(err))
	}

	s.op.Lock()
	s.lostMu.Lock()
	lost := s.lost
	s.lost = nil
	s.lostMu.Unlock()
	s.mu.Lock()
	for _, l := range lost {
		if s.owner[l.channel] == l.conn.addr {
			s.owner[l.channel] = ""
		}
	}
	var moves []string
	for ch, addr := range s.owner {
		if want := s.slots.addrOf(Slot(ch)); want != "" && want != addr {
			moves = append(moves, ch)
		}
	}
	s.mu.Unlock()
	if len(moves) > 0 && s.b.ctx.Err() == nil {
		s.move(ctx, moves)
	}
	s.retire()
	s.op.Unlock()
	s.refreshState(err == nil)
}

// move subscribes channels on the masters that serve their slots now, as
// an outage of those channels: what was published meanwhile is caught up.
func (s *shardSet) move(ctx context.Context, channels []string) {
	slices.Sort(channels)
	s.b.log.Info("following moved slots: resubscribing channels on their new masters",
		zap.Int("channels", len(channels)), zap.Strings("first", channels[:min(len(channels), 5)]))
	s.channelsDown(channels)
	groups, err := s.place(channels)
	if err != nil {
		s.b.log.Error("cannot place channels on their masters", zap.Error(err))
	}
	retry := false
	for c, chans := range groups {
		err := c.b.Subscribe(ctx, chans...)
		switch {
		case errors.Is(err, errMoved):
			retry = true
		case err != nil && !errors.Is(err, ErrDown):
			s.b.log.Warn("resubscribing moved channels not confirmed", zap.String("shard", c.addr),
				zap.Strings("channels", chans), zap.Error(err))
		}
	}
	if retry {
		s.poke()
	}
	inc(s.b.m.Reconnects)
	s.channelsUp(channels)
}

// channelsDown tells the Handler of an outage of channels: of those only, if it
// can hold them apart.
func (s *shardSet) channelsDown(channels []string) {
	if ch, ok := s.b.h.(ChannelHandler); ok {
		ch.HandleChannelsDown(channels)
		return
	}
	s.b.h.HandleDisconnect()
}

// channelsUp ends an outage told by channelsDown, from a goroutine of the
// broker's own (the Handler catches up from history).
func (s *shardSet) channelsUp(channels []string) {
	s.b.start(func() {
		if s.b.ctx.Err() != nil {
			return
		}
		if ch, ok := s.b.h.(ChannelHandler); ok {
			ch.HandleChannelsUp(channels)
			return
		}
		s.b.h.HandleReconnect()
	})
}

// retire closes the connections that no channel is placed on.
func (s *shardSet) retire() {
	s.mu.Lock()
	used := make(map[string]bool, len(s.conns))
	for _, addr := range s.owner {
		used[addr] = true
	}
	var idle []*shardConn
	var held [][]string
	for addr, c := range s.conns {
		if !used[addr] {
			idle = append(idle, c)
			delete(s.conns, addr)
			if c.down != nil {
				held = append(held, c.down)
				c.down = nil
			}
		}
	}
	s.mu.Unlock()
	for _, c := range idle {
		_ = c.b.Close()
	}
	// What a dead master's connection held is released: its channels
	// were moved (and caught up) or dropped.
	for _, chans := range held {
		s.channelsUp(chans)
	}
}

// refreshState works out whether every wanted channel is subscribed on a
// connection that is up, and the slots were read lately.
func (s *shardSet) refreshState(slotsRead bool) {
	s.mu.Lock()
	up := slotsRead || time.Since(s.readOK) < 3*s.every
	for _, addr := range s.owner {
		if addr == "" {
			up = false
			break
		}
	}
	conns := make([]*shardConn, 0, len(s.conns))
	for _, c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		if up && !c.b.Connected() {
			up = false
		}
	}
	s.setUp(up)
}

func (s *shardSet) setUp(up bool) {
	s.mu.Lock()
	changed := up != s.up
	if changed {
		s.up, s.since = up, time.Now()
	}
	s.mu.Unlock()
	if changed {
		setGauge(s.b.m.Connected, b2f(up))
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// state is Broker.State in sharded mode.
func (s *shardSet) state() (bool, time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.up, s.since
}

// shardHandler passes what a per-master connection reads to the sharded
// broker's Handler.
type shardHandler struct {
	s *shardSet
	c *shardConn
}

func (h shardHandler) HandleMessage(m Message) { h.s.b.h.HandleMessage(m) }

// HandleDisconnect holds the channels of the lost connection.
func (h shardHandler) HandleDisconnect() {
	h.s.setUp(false)
	if _, ok := h.s.b.h.(ChannelHandler); !ok {
		h.s.b.h.HandleDisconnect()
		return
	}
	chans := h.c.b.channelList()
	h.s.mu.Lock()
	h.c.down = append(h.c.down, chans...)
	h.s.mu.Unlock()
	h.s.channelsDown(chans)
}

// HandleReconnect releases them once it is back with every channel
// subscribed again; a late call, the connection down again meanwhile,
// leaves them to the next.
func (h shardHandler) HandleReconnect() {
	inc(h.s.b.m.Reconnects)
	// The master may have restarted without its data: presence is
	// written again at once (the libraries come back by the library
	// check).
	h.s.b.presenceResync()
	if _, ok := h.s.b.h.(ChannelHandler); !ok {
		h.s.b.h.HandleReconnect()
		h.s.refreshState(true)
		return
	}
	h.s.mu.Lock()
	var chans []string
	if h.c.b.Connected() {
		chans, h.c.down = h.c.down, nil
	}
	h.s.mu.Unlock()
	if chans != nil {
		h.s.channelsUp(chans)
	}
	h.s.refreshState(true)
}

// channelList is the channels the connection keeps subscribed.
func (b *Broker) channelList() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]string, 0, len(b.channels))
	for c := range b.channels {
		out = append(out, c)
	}
	return out
}

// isMoved reports a MOVED or ASK redirection.
func isMoved(err error) bool {
	msg := err.Error()
	return strings.HasPrefix(msg, "MOVED ") || strings.HasPrefix(msg, "ASK ")
}

// movedUnlock handles a MOVED (or ASK) answer to the command cmd of a
// per-master connection: the slot is another master's. The command's
// replies are dropped; the channels of an SSUBSCRIBE are forgotten here,
// its Subscribe call fails with errMoved, and the sharded broker is told
// to place them where they belong. It is called with b.mu held and
// releases it.
func (b *Broker) movedUnlock(cmd uint64, rerr error) {
	r, _ := b.inflight.peek()
	k, w := r.kind, r.w
	chans := b.popCommandLocked(cmd)
	var lost []string
	if k == kindSubscribe {
		for _, c := range chans {
			if _, ok := b.channels[c]; ok {
				delete(b.channels, c)
				lost = append(lost, c)
			}
		}
	}
	b.mu.Unlock()
	b.log.Debug("a node answered MOVED: the slot is another master's", zap.Strings("channels", chans), zap.Error(rerr))
	if w != nil && k == kindSubscribe {
		w.finish(fmt.Errorf("subscribe %q: %w (%v)", chans, errMoved, rerr))
	}
	b.handLost(lost)
}

// slotLostLocked handles an SUNSUBSCRIBE the connection did not ask for:
// the node dropped channel (or its twin) because it gave the slot away.
// Called with b.mu held.
func (b *Broker) slotLostLocked(name string) {
	c := name
	if ch, twin := b.channelOfTwin(name); twin {
		c = ch
	}
	if _, ok := b.channels[c]; !ok {
		return // dropped already, or the answer to our own SUNSUBSCRIBE
	}
	delete(b.channels, c)
	b.lostPending = append(b.lostPending, c)
}

// handLost tells the sharded broker about channels this connection lost.
// It must be called without b.mu held.
func (b *Broker) handLost(channels []string) {
	if sh, ok := b.h.(shardHandler); ok && len(channels) > 0 {
		sh.s.noteLost(sh.c, channels)
	}
}

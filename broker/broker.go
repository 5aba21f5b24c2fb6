// Package broker is the Redis side of caddy-sse: one pub/sub subscription
// connection per instance over go-redis (in sharded mode, one per master),
// confirmed subscribes, reconnect detection, the history (resume)
// functions, presence and lifecycle entries. It knows nothing of HTTP or
// Caddy; the registry reaches it through a small interface.
package broker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// ErrDown is returned by Subscribe when the subscription connection is down.
// The channels are recorded all the same and subscribed as soon as the
// connection is back, after which Handler.HandleReconnect is called: a
// caller keeps its stream open and catches up from history.
var ErrDown = errors.New("broker: redis subscription connection is down")

// ErrClosed is returned by the methods of a closed Broker.
var ErrClosed = errors.New("broker: closed")

// ErrReservedChannel is returned by Subscribe and Publish for a channel
// whose name starts with ResumableChannelPrefix: such a name is another
// channel's resumable twin.
var ErrReservedChannel = errors.New("broker: channel names starting with " + ResumableChannelPrefix + " are reserved")

// DefaultHealthCheck is the default Options.HealthCheck: a dead connection
// that TCP does not report is found within 2 to 3 seconds.
const DefaultHealthCheck = time.Second

// DefaultProbe is the default Options.Probe with Sentinel or Cluster: a
// subscription that stopped receiving is found within 2 to 3 seconds.
const DefaultProbe = time.Second

// DefaultLibraryCheck is the default Options.LibraryCheck.
const DefaultLibraryCheck = 10 * time.Second

// Options configures a Broker.
type Options struct {
	// Redis is the go-redis configuration: one address for a single server,
	// MasterName for Sentinel, several addresses (or Cluster) for a cluster.
	Redis *redis.UniversalOptions
	// Cluster forces a cluster client even with one address.
	Cluster bool
	// Sharded selects sharded mode on a Redis Cluster (it needs one): each
	// channel is subscribed with SSUBSCRIBE on a connection to the master
	// of its slot (one connection per master), its history and resumable
	// twin live in its slot (see ShardedHistoryKey), and resumable ids
	// count per channel. Without it a cluster is used with SUBSCRIBE, and
	// resumable events all go through the {sse} slot.
	Sharded bool
	// Logger receives faults and state changes, never one line per message.
	// Nil: no logging.
	Logger *zap.Logger
	// Metrics are updated as the connection changes; any field may be nil.
	Metrics Metrics
	// HealthCheck is how long the subscription connection may stay silent
	// (not a byte read) before the broker sends a PING; a further
	// HealthCheck still silent marks the connection dead. 0:
	// DefaultHealthCheck.
	HealthCheck time.Duration
	// Probe is how often the broker publishes a message on a channel of its
	// own (in sharded mode: reads the cluster's slots, to follow moves)
	// and checks that the subscription connection receives it; one not
	// received within two periods marks the connection dead. It catches
	// what a PING cannot: after a Sentinel failover, the old master keeps
	// the connection open and answers PINGs, but what is published now
	// goes to the new master. 0: DefaultProbe with Sentinel or Cluster, no
	// probe with a single server; negative: no probe.
	Probe time.Duration
	// LibraryCheck is how often, once EnsureHistory has loaded the function
	// library, the broker checks that Redis still has it and loads it again
	// if not (FUNCTION FLUSH, a failover to a node without it), so that
	// backends calling FCALL sse_publish directly recover without waiting
	// for a reconnect. 0: DefaultLibraryCheck; negative: no check.
	LibraryCheck time.Duration
	// Instance names this process in Redis: its presence fields, its
	// liveness key and its lifecycle entries. It must not hold "|".
	// Empty: "instance-" and a random suffix.
	Instance string
}

// Metrics are the collectors a Broker updates. The caller creates and
// registers them; any field may be nil.
type Metrics struct {
	// Connected is 1 while the subscription connection is up.
	Connected prometheus.Gauge
	// Reconnects counts re-established subscription connections.
	Reconnects prometheus.Counter
	// Channels is the number of channels currently subscribed: the set the
	// broker keeps subscribed, including through an outage.
	Channels prometheus.Gauge
	// Received counts messages read from Redis.
	Received prometheus.Counter
	// Rejected counts messages that claimed an id they cannot carry, by
	// reason: "forged_frame" (a plain PUBLISH whose payload starts with
	// FramePrefix: delivered as plain data, without an id) and "bad_frame"
	// (a message on a resumable twin that is not a frame: dropped).
	Rejected *prometheus.CounterVec
	// PresenceFailures counts presence writes that Redis failed (retried).
	PresenceFailures prometheus.Counter
	// LifecycleDropped counts lifecycle entries dropped, by reason:
	// DropQueueFull, DropRedis or DropStopped.
	LifecycleDropped *prometheus.CounterVec
}

// Reasons of Metrics.Rejected.
const (
	rejectForged = "forged_frame"
	rejectBad    = "bad_frame"
)

// Broker owns one Redis client and the one pub/sub connection that every
// stream of the instance shares (in sharded mode, a Broker per master's
// connection), and every goroutine it starts. Its methods are safe for
// concurrent use.
type Broker struct {
	sharded bool      // sharded mode: see Options.Sharded
	shards  *shardSet // in sharded mode, the per-master connections
	outer   *Broker   // for a per-master connection, the broker it serves

	client   redis.UniversalClient
	cluster  *redis.ClusterClient // client, when it is a cluster client
	sub      *redis.Client        // in a cluster (not sharded), the subscription connection's client
	subAddr  atomic.Pointer[string]
	addrs    []string // for the log
	h        Handler
	log      *zap.Logger
	m        Metrics
	interval time.Duration

	rejForged, rejBad prometheus.Counter // Metrics.Rejected's series, nil without it
	rejectLog         rejectLimiter      // the reader's only

	ctx    context.Context // ends when Close starts; every goroutine of the broker runs on it
	psCtx  context.Context // ctx, marking the subscription connection's dials
	cancel context.CancelFunc
	wg     sync.WaitGroup // the broker's goroutines, which Close waits for (see start)
	wake   chan struct{}  // tells the writer that pending has work

	libEvery time.Duration // the library check's period; <= 0: none

	rx atomic.Uint64 // bytes read on the subscription connection, for the watchdog

	probeChan  string        // the channel the probe publishes on; "" without probe
	probeEvery time.Duration // the probe's period
	probeSeen  atomic.Uint64 // the last probe number received
	probeSent  atomic.Uint64 // the last probe number published
	probeOff   atomic.Bool   // Redis refused the probe: stop probing

	mu       sync.Mutex
	closed   bool                // Close has started: no goroutine starts any more
	ps       *redis.PubSub       // nil while down
	ready    bool                // ps is dialed: the writer may write
	killed   error               // why ps was closed under the reader, if it was
	up       bool                // ps is confirmed: every channel subscribed
	outage   bool                // down since downAt, not yet reported up
	downAt   time.Time           // start of the current outage
	refusal  string              // the last error reply of the current outage logged at warn
	channels map[string]struct{} // what Redis should have us subscribed to
	pending  []op                // queued for the writer, for ps
	inflight replyQueue          // replies ps owes, in command order
	nextCmd  uint64              // numbers the commands written
	barrier  uint64              // the barrier PING whose pong marks ps up

	hist history

	instance string    // see Options.Instance
	created  time.Time // for State before the first connection

	upAt time.Time // when up last became true; guarded by mu

	lostPending []string // a per-master connection's channels its node dropped; guarded by mu

	// Presence and lifecycle writers, started on demand (see presence.go,
	// lifecycle.go).
	presOn   atomic.Bool
	presTTL  atomic.Int64 // time.Duration
	presWake chan struct{}
	pres     presenceState
	lifeOn   atomic.Bool
	lifeQ    chan LifecycleEvent
	lifeLog  dropLimiter
}

// New creates a Broker for h and starts its connection in the background. It
// fails only on invalid options: an unreachable Redis is an outage like any
// other, reported by Connected, the metrics and the log, and retried.
func New(opts Options, h Handler) (*Broker, error) {
	return build(opts, h, nil)
}

// build is New; outer is set for a per-master connection of a sharded
// broker, which subscribes with SSUBSCRIBE and serves outer's Handler.
func build(opts Options, h Handler, outer *Broker) (*Broker, error) {
	ro, err := redisOptions(opts, h)
	if err != nil {
		return nil, err
	}
	plain := ro // without the counting dialer, for the per-master connections
	b := &Broker{
		instance: cmp.Or(opts.Instance, "instance-"+strconv.FormatUint(rand.Uint64(), 36)),
		created:  time.Now(),
		presWake: make(chan struct{}, 1),
		lifeQ:    make(chan LifecycleEvent, LifecycleQueue),
		addrs:    ro.Addrs,
		h:        h,
		log:      cmp.Or(opts.Logger, zap.NewNop()),
		m:        opts.Metrics,
		interval: cmp.Or(opts.HealthCheck, DefaultHealthCheck),
		wake:     make(chan struct{}, 1),
		channels: make(map[string]struct{}),
		libEvery: cmp.Or(opts.LibraryCheck, DefaultLibraryCheck),
		outer:    outer,
		sharded:  opts.Sharded || outer != nil,
	}
	if err := b.newClients(ro, opts.Sharded); err != nil {
		return nil, err
	}
	if b.m.Rejected != nil {
		b.rejForged = b.m.Rejected.WithLabelValues(rejectForged)
		b.rejBad = b.m.Rejected.WithLabelValues(rejectBad)
	}
	b.planProbe(opts.Probe, ro.MasterName != "", plain)
	// A per-master connection ends with the sharded broker it serves.
	parent := context.Background()
	if outer != nil {
		parent = outer.ctx
	}
	b.ctx, b.cancel = context.WithCancel(parent)
	b.psCtx = context.WithValue(b.ctx, subConnKey{}, true)
	setGauge(b.m.Connected, 0)
	setGauge(b.m.Channels, 0)
	if sh, ok := h.(shardHandler); ok {
		sh.c.b = b // before the reader may call it
	}
	b.run()
	return b, nil
}

// redisOptions checks opts and returns a copy of its Redis options, the
// caller's left untouched.
func redisOptions(opts Options, h Handler) (redis.UniversalOptions, error) {
	var ro redis.UniversalOptions
	if h == nil {
		return ro, errors.New("broker: nil Handler")
	}
	if opts.Redis == nil {
		return ro, errors.New("broker: Options.Redis is required")
	}
	if opts.HealthCheck < 0 {
		return ro, fmt.Errorf("broker: negative health check interval %s", opts.HealthCheck)
	}
	ro = *opts.Redis
	ro.Addrs = append([]string(nil), ro.Addrs...)
	if len(ro.Addrs) == 0 {
		return ro, errors.New("broker: no Redis address in Options.Redis.Addrs")
	}
	for _, a := range ro.Addrs {
		if a == "" {
			return ro, errors.New("broker: empty Redis address in Options.Redis.Addrs")
		}
	}
	if ro.DB != 0 && (opts.Cluster || len(ro.Addrs) > 1 && ro.MasterName == "") {
		return ro, fmt.Errorf("broker: Redis Cluster has no database %d (only 0)", ro.DB)
	}
	if opts.Cluster {
		ro.IsClusterMode = true
	}
	if strings.Contains(opts.Instance, "|") {
		return ro, fmt.Errorf("broker: instance name %q holds a |", opts.Instance)
	}
	return ro, nil
}

// newClients creates the Redis client (it does no I/O yet) and, in a
// cluster without sharding, the client of the subscription connection.
func (b *Broker) newClients(ro redis.UniversalOptions, sharded bool) error {
	ro.Dialer = b.countingDialer(ro)
	b.client = redis.NewUniversalClient(&ro)
	b.cluster, _ = b.client.(*redis.ClusterClient)
	if sharded && b.cluster == nil {
		_ = b.client.Close()
		return errors.New("broker: sharded mode needs a Redis Cluster")
	}
	if b.cluster != nil && !b.sharded {
		b.sub = b.clusterSubClient(ro)
	}
	return nil
}

// planProbe sets the probe's period and channel (see Options.Probe); a
// sharded broker follows the slots at that period instead, on the
// per-master connections of shards, which it creates with plain.
func (b *Broker) planProbe(every time.Duration, sentinel bool, plain redis.UniversalOptions) {
	b.probeEvery = every
	if b.probeEvery == 0 && (sentinel || b.cluster != nil) {
		b.probeEvery = DefaultProbe
	}
	if b.sharded && b.outer == nil {
		// No subscription connection of its own: the per-master ones
		// follow the slots, which are read every probe period.
		b.shards = newShardSet(b, plain, b.probeEvery)
		b.probeEvery = 0
	}
	if b.probeEvery > 0 {
		// Each instance probes on a channel of its own, so that one never
		// takes another's probe for its own.
		b.probeChan = "sse:probe:" + strconv.FormatUint(rand.Uint64(), 36)
	}
}

// run starts the broker's goroutines.
func (b *Broker) run() {
	if b.shards != nil {
		b.wg.Go(b.shards.follow)
		b.wg.Go(b.checkLibrary)
		return
	}
	// The first PubSub is installed before New returns (it does no I/O), so
	// that a Subscribe right after New waits for the first connection
	// instead of finding the broker down.
	ps := b.connect()
	b.wg.Go(func() { b.readLoop(ps) })
	b.wg.Go(b.writeLoop)
	b.wg.Go(b.checkLibrary)
}

// Subscribe subscribes the connection to channels, each with its resumable
// twin (ResumableChannelPrefix+channel) in the same command, and returns
// once Redis has confirmed every one of them, so that a message published
// after it returns is received. It returns ctx.Err() if ctx ends first (the subscription
// still completes in the background), ErrDown at once if the connection is
// down (the channels are subscribed when it is back), and the Redis error if
// Redis refuses the command (for example an ACL that forbids a channel: the
// channels are then not subscribed).
//
// A channel named with the reserved prefix fails the whole call with
// ErrReservedChannel, nothing subscribed. (An ACL on channels must allow
// the twins too.)
//
// Subscribe does no reference counting: a channel subscribed twice is
// subscribed once, and one Unsubscribe ends it.
func (b *Broker) Subscribe(ctx context.Context, channels ...string) error {
	channels = dedupe(channels)
	if len(channels) == 0 {
		return nil
	}
	for _, c := range channels {
		if b.reserved(c) {
			return fmt.Errorf("subscribe %q: %w", c, b.reservedErr())
		}
	}
	if b.shards != nil {
		return b.shards.subscribe(ctx, channels)
	}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return ErrClosed
	}
	for _, c := range channels {
		b.channels[c] = struct{}{}
	}
	setGauge(b.m.Channels, float64(len(b.channels)))
	if b.ps == nil {
		b.mu.Unlock()
		return fmt.Errorf("subscribe %q: %w", channels, ErrDown)
	}
	if b.outage {
		// Reconnecting: the channels go out on the new connection, and a
		// new barrier makes sure the reconnect (and HandleReconnect, which
		// the caller relies on to catch up) waits for them too.
		b.pending = append(b.pending,
			op{kind: kindSubscribe, channels: channels},
			b.barrierLocked())
		b.mu.Unlock()
		b.kick()
		return fmt.Errorf("subscribe %q: %w", channels, ErrDown)
	}
	// Two confirmations per channel: its own and its twin's.
	w := &waiter{channels: channels, remaining: 2 * len(channels), done: make(chan struct{})}
	b.pending = append(b.pending, op{kind: kindSubscribe, channels: channels, w: w})
	b.mu.Unlock()
	b.kick()

	select {
	case <-w.done:
		return w.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Unsubscribe unsubscribes the connection from channels and their twins. It
// queues the UNSUBSCRIBE and returns without waiting for Redis.
func (b *Broker) Unsubscribe(channels ...string) {
	// A reserved name was never subscribed; as is, it would name the twin
	// of a channel that still has listeners.
	channels = slices.DeleteFunc(slices.Clone(dedupe(channels)), b.reserved)
	if len(channels) == 0 {
		return
	}
	if b.shards != nil {
		b.shards.unsubscribe(channels)
		return
	}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return
	}
	for _, c := range channels {
		delete(b.channels, c)
	}
	setGauge(b.m.Channels, float64(len(b.channels)))
	// While down there is nothing to tell Redis: the next connection only
	// subscribes what is left in b.channels.
	if b.ps != nil {
		b.pending = append(b.pending, op{kind: kindUnsubscribe, channels: channels})
	}
	b.mu.Unlock()
	b.kick()
}

// Connected reports whether the subscription connection is up, with every
// channel confirmed.
func (b *Broker) Connected() bool {
	if b.shards != nil {
		up, _ := b.shards.state()
		return up
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.up
}

// State reports whether the subscription connection is up, with every
// channel confirmed, and since when it has been up, or down (or, before the
// first connection, since the broker was created).
func (b *Broker) State() (up bool, since time.Time) {
	if b.shards != nil {
		return b.shards.state()
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case b.up:
		return true, b.upAt
	case b.outage:
		return false, b.downAt
	}
	return false, b.created
}

// Instance is the name of this process in Redis (see Options.Instance).
func (b *Broker) Instance() string { return b.instance }

// Go runs fn in a goroutine that the broker owns, for a caller's
// background call to Redis: ctx ends when Close starts, and Close waits
// for fn to return before it closes the client. Once Close has started, Go
// does not run fn and returns false.
func (b *Broker) Go(fn func(ctx context.Context)) bool {
	return b.start(func() { fn(b.ctx) })
}

// start runs fn in a goroutine that Close waits for, unless Close has
// started. (Taking mu orders every Add before Close's Wait.)
func (b *Broker) start(fn func()) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return false
	}
	b.wg.Go(fn)
	return true
}

// Close stops the connection, waits for every goroutine of the broker
// (presence and lifecycle write what is left, within stopTimeout) and
// closes the client. Subscribe calls waiting for a confirmation return
// ErrClosed. Closing twice returns ErrClosed.
func (b *Broker) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return ErrClosed
	}
	b.closed = true
	ps := b.ps
	b.ps, b.up = nil, false
	failed := b.dropQueuesLocked()
	b.mu.Unlock()

	b.cancel()
	for _, w := range failed {
		w.finish(ErrClosed)
	}
	if ps != nil {
		// Closing the PubSub closes its connection, which ends the reader's
		// blocking read at once.
		_ = ps.Close()
	}
	b.wg.Wait()
	if b.shards != nil {
		// After the follower, which opens them.
		b.shards.close()
	}
	setGauge(b.m.Connected, 0)
	if b.sub != nil {
		_ = b.sub.Close()
	}
	if err := b.client.Close(); err != nil && !errors.Is(err, redis.ErrClosed) {
		return fmt.Errorf("broker: close redis client: %w", err)
	}
	return nil
}

func (b *Broker) kick() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

func dedupe(channels []string) []string {
	if len(channels) < 2 {
		return channels
	}
	seen := make(map[string]struct{}, len(channels))
	out := make([]string, 0, len(channels))
	for _, c := range channels {
		if _, ok := seen[c]; !ok {
			seen[c] = struct{}{}
			out = append(out, c)
		}
	}
	return out
}

func setGauge(g prometheus.Gauge, v float64) {
	if g != nil {
		g.Set(v)
	}
}

func inc(c prometheus.Counter) {
	if c != nil {
		c.Inc()
	}
}

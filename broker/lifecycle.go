package broker

import (
	"context"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// Lifecycle events tell a backend that a stream opened or ended, without
// it holding a connection: each is an entry of a Redis stream it reads with
// XREAD or a consumer group,
//
//	XADD <key> MAXLEN ~ <maxlen> * type open|close channels <a,b> identity <id>
//	     instance <instance> [reason <reason>] time <unix ms>
//
// Entries are queued in memory (at most LifecycleQueue) and written by one
// goroutine in pipelines; a full queue, or a Redis that fails the write,
// drops them and counts them in Metrics.LifecycleDropped. A stream never
// waits for Redis.

// LifecycleQueue is how many lifecycle entries wait for Redis at most.
const LifecycleQueue = 4096

// lifecycleBatch bounds the entries of one pipeline.
const lifecycleBatch = 512

// Reasons of Metrics.LifecycleDropped.
const (
	DropQueueFull = "queue_full" // LifecycleQueue entries were waiting
	DropRedis     = "redis"      // Redis failed the write
	DropStopped   = "stopped"    // the broker was closed
)

// LifecycleEvent is one entry of a lifecycle stream.
type LifecycleEvent struct {
	// Stream is the key of the Redis stream, MaxLen its approximate cap.
	Stream string
	MaxLen int64
	// Type is "open" or "close".
	Type string
	// Channels are the stream's channels, comma-separated.
	Channels string
	// Identity is the stream's presence identity, "" if anonymous.
	Identity string
	// Reason is why the stream ended (close only).
	Reason string
	// Time is when it happened.
	Time time.Time
}

// EnableLifecycle starts the lifecycle writer, once.
func (b *Broker) EnableLifecycle() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed || b.lifeOn.Load() {
		return
	}
	b.lifeOn.Store(true)
	b.wg.Go(b.lifecycleLoop) // b.mu held and not closed: see start
}

// Lifecycle queues e for the writer without blocking; when it cannot, e is
// dropped and counted. It reports whether e was queued.
func (b *Broker) Lifecycle(e LifecycleEvent) bool {
	if !b.lifeOn.Load() || b.ctx.Err() != nil {
		b.lifeDropped(DropStopped, 1, nil)
		return false
	}
	select {
	case b.lifeQ <- e:
		return true
	default:
		b.lifeDropped(DropQueueFull, 1, nil)
		return false
	}
}

// lifecycleLoop is the writer: it takes what is queued, up to
// lifecycleBatch entries, and writes it in one pipeline; after a failure
// it backs off (entries queue meanwhile, up to LifecycleQueue). On Close it
// writes what is left, within stopTimeout.
func (b *Broker) lifecycleLoop() {
	batch := make([]LifecycleEvent, 0, lifecycleBatch)
	failures := 0
	for {
		select {
		case <-b.ctx.Done():
			b.lifecycleDrain(batch)
			return
		case e := <-b.lifeQ:
			batch = append(batch[:0], e)
		}
		batch = b.takeLifecycle(batch)
		ctx, cancel := context.WithTimeout(b.ctx, presenceTimeout)
		err := b.writeLifecycle(ctx, batch)
		cancel()
		if err == nil {
			failures = 0
			clear(batch)
			continue
		}
		if b.ctx.Err() != nil {
			// Close cut the write short: the drain tries these again.
			b.lifecycleDrain(batch)
			return
		}
		b.lifeDropped(DropRedis, len(batch), err)
		clear(batch)
		if !b.sleep(backoff(failures)) {
			b.lifecycleDrain(batch[:0])
			return
		}
		failures++
	}
}

// takeLifecycle adds to batch what is queued, without waiting.
func (b *Broker) takeLifecycle(batch []LifecycleEvent) []LifecycleEvent {
	for len(batch) < lifecycleBatch {
		select {
		case e := <-b.lifeQ:
			batch = append(batch, e)
		default:
			return batch
		}
	}
	return batch
}

// lifecycleDrain writes batch and what is queued when the broker closes:
// the ends of the streams that a stop closed are worth telling.
func (b *Broker) lifecycleDrain(batch []LifecycleEvent) {
	// The broker's context has ended; the drain has stopTimeout of its own.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(b.ctx), stopTimeout)
	defer cancel()
	for {
		batch = b.takeLifecycle(batch)
		if len(batch) == 0 {
			return
		}
		if err := b.writeLifecycle(ctx, batch); err != nil {
			n := len(batch) + len(b.lifeQ)
			b.lifeDropped(DropRedis, n, err)
			return
		}
		clear(batch)
		batch = batch[:0]
	}
}

// writeLifecycle appends batch to the streams in one pipeline.
func (b *Broker) writeLifecycle(ctx context.Context, batch []LifecycleEvent) error {
	pipe := b.client.Pipeline()
	for _, e := range batch {
		values := make([]string, 0, 12)
		values = append(values, "type", e.Type, "channels", e.Channels, "identity", e.Identity,
			"instance", b.instance)
		if e.Reason != "" {
			values = append(values, "reason", e.Reason)
		}
		values = append(values, "time", strconv.FormatInt(e.Time.UnixMilli(), 10))
		pipe.XAdd(ctx, &redis.XAddArgs{Stream: e.Stream, MaxLen: e.MaxLen, Approx: true, Values: values})
	}
	_, err := pipe.Exec(ctx)
	return err
}

// lifeDropped counts n dropped entries and warns, at most once per
// rejectLogEvery, with how many were dropped since the last warning.
func (b *Broker) lifeDropped(reason string, n int, err error) {
	if b.m.LifecycleDropped != nil {
		b.m.LifecycleDropped.WithLabelValues(reason).Add(float64(n))
	}
	if ok, dropped := b.lifeLog.allow(time.Now(), n); ok {
		fields := []zap.Field{zap.String("reason", reason), zap.Int("dropped", dropped)}
		if err != nil {
			fields = append(fields, zap.Error(err))
		}
		b.log.Warn("lifecycle events dropped", fields...)
	}
}

// dropLimiter lets one warning through per rejectLogEvery, counting what
// the suppressed ones were about. Safe for concurrent use: streams drop
// entries on their own goroutines.
type dropLimiter struct {
	mu      sync.Mutex
	last    time.Time
	pending int
}

// allow adds n and reports whether to warn now, with the total since the
// last warning.
func (l *dropLimiter) allow(now time.Time, n int) (bool, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.pending += n
	if !l.last.IsZero() && now.Sub(l.last) < rejectLogEvery {
		return false, 0
	}
	total := l.pending
	l.last, l.pending = now, 0
	return true, total
}

// ModuleKey reports whether key is one the module writes itself (history,
// counters, closed marks, presence, liveness): a lifecycle stream must not
// be one of them.
func ModuleKey(key string) bool {
	switch key {
	case SeqKey, EpochKey, ClusterSeqKey, ClusterEpochKey:
		return true
	}
	for _, p := range []string{HistoryKeyPrefix, ClusterKeyPrefix, ClosedKeyPrefix, PresenceKeyPrefix, InstanceKeyPrefix} {
		if strings.HasPrefix(key, p) {
			return true
		}
	}
	return false
}

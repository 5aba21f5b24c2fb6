package broker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// Presence tells a backend who is connected to a channel, across every
// instance, in one command from any Redis client:
//
//	FCALL sse_presence 1 {sse}:presence:<channel>
//
// returns a flat list identity, count, identity, count... (sorted by
// identity): the streams each identity has open on the channel, summed over
// the live instances.
//
// Redis 7.0 has no expiry per hash field, so an instance's share of a
// channel lives in fields of their own, and its liveness in a key with an
// expiry:
//
//	{sse}:presence:<channel>   hash: "<instance>|<identity>" -> streams
//	{sse}:instance:<instance>  "1", EX ttl, refreshed every ttl/3
//
// sse_presence (library caddy_sse_presence) skips the fields of instances
// whose liveness key is gone, and deletes them on the way: an instance that
// dies without cleaning up (kill -9, a lost host) stops counting within ttl
// of its last refresh, with no cleanup job. A clean stop deletes the
// instance's fields and liveness key at once.
//
// Every key carries the hash tag {sse}, in every mode, so that the function
// reaches a channel's hash and the liveness keys in one command on Redis
// Cluster too (they all live on the shard of the {sse} slot, with the
// history). One prefix everywhere keeps the read command the same on a
// single server, Sentinel and Cluster.
//
// Writes are batched: stream opens and closes only change counts in memory;
// one goroutine writes what changed, at most every presenceFlushEvery, in
// one pipeline that also refreshes the liveness key. Values are absolute
// (HSET the count, HDEL at 0), not increments, so that a pipeline that
// failed half way is simply written again. The liveness refresh is a SET
// with GET: when it finds the key missing (Redis restarted or was flushed,
// or the key expired and readers may have deleted this instance's fields)
// the instance writes its whole state again. The broker's reconnect does
// the same at once.

const (
	// PresenceLibraryName is the function library EnablePresence loads.
	PresenceLibraryName = "caddy_sse_presence"
	// PresenceFunction reads a channel's presence.
	PresenceFunction = "sse_presence"
	// PresenceKeyPrefix + channel is the hash of a channel's presence.
	PresenceKeyPrefix = "{sse}:presence:"
	// InstanceKeyPrefix + instance is an instance's liveness key.
	InstanceKeyPrefix = "{sse}:instance:"
	// DefaultPresenceTTL is how long an instance that stopped refreshing
	// its liveness key (killed) keeps counting at most.
	DefaultPresenceTTL = 30 * time.Second
	// MinPresenceTTL is the shortest ttl accepted: the key's expiry is in
	// whole seconds and refreshed every ttl/3.
	MinPresenceTTL = 3 * time.Second
)

const (
	// presenceFlushEvery batches the changes of a burst of streams into one
	// pipeline.
	presenceFlushEvery = 100 * time.Millisecond
	// presenceBatch bounds the commands of one pipeline (a full rewrite
	// after a restart may hold one per channel and identity).
	presenceBatch = 1024
	// presenceTimeout bounds one flush.
	presenceTimeout = 5 * time.Second
	// stopTimeout bounds the cleanup writes of Close (presence fields,
	// queued lifecycle entries): Caddy's stop must stay prompt when Redis
	// is down.
	stopTimeout = time.Second
)

// presenceLibrary is the Lua source of the presence function library.
// Fields without a "|" are not the module's and are left alone. The
// liveness keys are not declared (their names come from the fields), which
// Redis allows; they share the {sse} slot with the hash, so that it works
// on a cluster.
const presenceLibrary = `#!lua name=caddy_sse_presence
-- caddy-sse: who is connected to a channel, across every Caddy instance.
-- FCALL sse_presence 1 {sse}:presence:<channel>
-- returns identity, count, identity, count... sorted by identity. Fields of
-- instances whose liveness key {sse}:instance:<id> is gone are deleted.

local prefix = '{{PRESENCE}}'
local instance_prefix = '{{INSTANCE}}'

local function sse_presence(keys, args)
  if #keys ~= 1 or #args ~= 0 or string.sub(keys[1], 1, #prefix) ~= prefix then
    return redis.error_reply('ERR usage: FCALL sse_presence 1 ' .. prefix .. '<channel>')
  end
  local key = keys[1]
  local fields = redis.call('HGETALL', key)
  local alive, counts, order, dead = {}, {}, {}, {}
  for i = 1, #fields, 2 do
    local f = fields[i]
    local sep = string.find(f, '|', 1, true)
    if sep then
      local instance = string.sub(f, 1, sep - 1)
      local up = alive[instance]
      if up == nil then
        up = redis.call('EXISTS', instance_prefix .. instance) == 1
        alive[instance] = up
      end
      if up then
        local identity = string.sub(f, sep + 1)
        local n = tonumber(fields[i + 1])
        if n and n > 0 then
          if counts[identity] == nil then
            counts[identity] = 0
            order[#order + 1] = identity
          end
          counts[identity] = counts[identity] + n
        end
      else
        dead[#dead + 1] = f
      end
    end
  end
  -- unpack has a limit on its arguments: delete in chunks.
  for i = 1, #dead, 500 do
    redis.call('HDEL', key, unpack(dead, i, math.min(i + 499, #dead)))
  end
  table.sort(order)
  local out = {}
  for _, identity in ipairs(order) do
    out[#out + 1] = identity
    out[#out + 1] = counts[identity]
  end
  return out
end

redis.register_function('sse_presence', sse_presence)
`

func presenceLibraryCode() string {
	return strings.NewReplacer("{{PRESENCE}}", PresenceKeyPrefix, "{{INSTANCE}}", InstanceKeyPrefix).
		Replace(presenceLibrary)
}

// presenceKey is one channel and identity of this instance.
type presenceKey struct{ channel, identity string }

// presenceOp is one field to write: its count, or HDEL at 0.
type presenceOp struct {
	key presenceKey
	n   int64
}

// presenceState is what this instance holds and what Redis holds of it.
type presenceState struct {
	mu sync.Mutex
	// state is the streams open per channel and identity.
	state map[presenceKey]int64
	// written is what Redis holds, as last written; -1: unknown, write it.
	written map[presenceKey]int64
	// dirty are the keys whose state changed since the last flush.
	dirty map[presenceKey]struct{}
	// resync asks the next flush to write everything again.
	resync bool
	// stopped: the flusher is gone; changes are no longer recorded.
	stopped bool
}

// EnablePresence starts this instance's presence writer, once, and loads
// the presence function library. ttl (<= 0: DefaultPresenceTTL) bounds how
// long this instance keeps counting after it is killed; the shortest ttl
// asked for wins.
func (b *Broker) EnablePresence(ttl time.Duration) {
	if ttl <= 0 {
		ttl = DefaultPresenceTTL
	}
	ttl = max(ttl, MinPresenceTTL)
	for {
		cur := b.presTTL.Load()
		if cur != 0 && time.Duration(cur) <= ttl {
			break
		}
		if b.presTTL.CompareAndSwap(cur, int64(ttl)) {
			b.presKick()
			break
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed || b.presOn.Load() {
		return
	}
	b.pres.state = make(map[presenceKey]int64)
	b.pres.written = make(map[presenceKey]int64)
	b.pres.dirty = make(map[presenceKey]struct{})
	b.presOn.Store(true)
	b.wg.Go(b.presenceLoop) // b.mu held and not closed: see start
}

// PresenceAdd counts delta streams (1 on open, -1 on close) of identity on
// each of channels. It only changes counts in memory: it never waits for
// Redis. Without EnablePresence, or with an empty identity, it does
// nothing.
func (b *Broker) PresenceAdd(channels []string, identity string, delta int64) {
	if identity == "" || !b.presOn.Load() {
		return
	}
	p := &b.pres
	p.mu.Lock()
	if p.stopped {
		p.mu.Unlock()
		return
	}
	for _, c := range channels {
		k := presenceKey{c, identity}
		if n := p.state[k] + delta; n > 0 {
			p.state[k] = n
		} else {
			delete(p.state, k)
		}
		p.dirty[k] = struct{}{}
	}
	p.mu.Unlock()
	b.presKick()
}

func (b *Broker) presKick() {
	select {
	case b.presWake <- struct{}{}:
	default:
	}
}

// presenceResync makes the next flush write this instance's whole state,
// at once: Redis may have lost it.
func (b *Broker) presenceResync() {
	if !b.presOn.Load() {
		return
	}
	b.pres.mu.Lock()
	b.pres.resync = true
	b.pres.mu.Unlock()
	b.presKick()
}

// presenceLoop is the presence writer: it flushes what changed (a burst
// batched over presenceFlushEvery) and refreshes the liveness key every
// ttl/3, backing off while Redis fails. On Close it deletes this
// instance's fields and liveness key.
func (b *Broker) presenceLoop() {
	defer b.presenceStop()
	b.loadPresenceLibrary(b.ctx, true)
	beat := time.NewTimer(0) // the liveness key at once
	defer beat.Stop()
	var retry <-chan time.Time
	failures := 0
	for {
		wake := b.presWake
		if retry != nil {
			wake = nil // backing off: changes wait for the retry
		}
		select {
		case <-b.ctx.Done():
			return
		case <-beat.C:
		case <-retry:
		case <-wake:
			if !b.sleep(presenceFlushEvery) {
				return
			}
		}
		ttl := time.Duration(b.presTTL.Load())
		ctx, cancel := context.WithTimeout(b.ctx, presenceTimeout)
		err := b.presenceFlush(ctx, ttl)
		cancel()
		beat.Reset(ttl / 3)
		if err == nil {
			retry, failures = nil, 0
			continue
		}
		if b.ctx.Err() != nil {
			return
		}
		inc(b.m.PresenceFailures)
		if failures == 0 {
			b.log.Warn("cannot write presence to redis; retrying", zap.Error(err))
		}
		retry = time.After(backoff(failures))
		failures++
	}
}

// presenceFlush writes the changed counts and refreshes the liveness key,
// in pipelines of at most presenceBatch commands, the liveness key first
// so that readers never take fresh fields for a dead instance's.
func (b *Broker) presenceFlush(ctx context.Context, ttl time.Duration) error {
	p := &b.pres
	ops := p.changes()
	first, lost := true, false
	for first || len(ops) > 0 {
		n := min(len(ops), presenceBatch)
		batch := ops[:n]
		gone, err := b.writePresence(ctx, batch, first, ttl)
		if err != nil {
			// Written again at the next flush: HSET and HDEL are
			// idempotent.
			p.retry(ops)
			return fmt.Errorf("presence: %w", err)
		}
		if p.wrote(batch, gone) {
			lost = true
		}
		ops, first = ops[n:], false
	}
	if lost {
		b.presKick()
	}
	return nil
}

// changes takes the fields to write: those whose count changed since it
// was last written, or every one if a resync was asked for.
func (p *presenceState) changes() []presenceOp {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.resync {
		p.resync = false
		for k := range p.written {
			p.written[k] = -1
			p.dirty[k] = struct{}{}
		}
		for k := range p.state {
			p.written[k] = -1
			p.dirty[k] = struct{}{}
		}
	}
	ops := make([]presenceOp, 0, len(p.dirty))
	for k := range p.dirty {
		if n := p.state[k]; n != p.written[k] {
			ops = append(ops, presenceOp{k, n})
		}
	}
	clear(p.dirty)
	return ops
}

// retry marks the fields of ops for the next flush.
func (p *presenceState) retry(ops []presenceOp) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, op := range ops {
		p.dirty[op.key] = struct{}{}
	}
}

// wrote records that Redis holds batch. gone is whether the liveness key
// was missing: Redis lost its data, or it expired and readers may have
// deleted this instance's fields. If this instance has any, it asks for a
// resync and reports true.
func (p *presenceState) wrote(batch []presenceOp, gone bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, op := range batch {
		if op.n > 0 {
			p.written[op.key] = op.n
		} else {
			delete(p.written, op.key)
		}
	}
	if gone && len(p.written)+len(p.state) > 0 {
		p.resync = true
		return true
	}
	return false
}

// writePresence writes batch in one pipeline, with the liveness key first
// if first, and reports whether that key was gone.
func (b *Broker) writePresence(ctx context.Context, batch []presenceOp, first bool, ttl time.Duration) (gone bool, err error) {
	var alive *redis.StatusCmd
	var cmds []redis.Cmder
	err = b.topology(ctx, func() error {
		pipe := b.client.Pipeline()
		if first {
			alive = pipe.SetArgs(ctx, InstanceKeyPrefix+b.instance, "1", redis.SetArgs{TTL: ttlCeil(ttl), Get: true})
		}
		for _, op := range batch {
			key, field := PresenceKeyPrefix+op.key.channel, b.instance+"|"+op.key.identity
			if op.n > 0 {
				pipe.HSet(ctx, key, field, op.n)
			} else {
				pipe.HDel(ctx, key, field)
			}
		}
		var err error
		cmds, err = pipe.Exec(ctx)
		if errors.Is(err, redis.Nil) {
			err = nil // the GET of a missing liveness key: gone
		}
		return err
	})
	if err != nil {
		return false, err
	}
	for _, c := range cmds {
		if cerr := c.Err(); cerr != nil && !errors.Is(cerr, redis.Nil) {
			return false, cerr
		}
	}
	return first && errors.Is(alive.Err(), redis.Nil), nil
}

// presenceStop runs when the broker closes: changes are no longer
// recorded, and this instance's liveness key (first, so that readers
// ignore the rest at once) and fields are deleted, within stopTimeout.
func (b *Broker) presenceStop() {
	p := &b.pres
	p.mu.Lock()
	p.stopped = true
	fields := make(map[presenceKey]struct{}, len(p.written)+len(p.state))
	for k := range p.written {
		fields[k] = struct{}{}
	}
	for k := range p.state {
		fields[k] = struct{}{}
	}
	p.mu.Unlock()

	// The broker's context has ended; the cleanup has stopTimeout of its own.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(b.ctx), stopTimeout)
	defer cancel()
	pipe := b.client.Pipeline()
	pipe.Del(ctx, InstanceKeyPrefix+b.instance)
	for k := range fields {
		pipe.HDel(ctx, PresenceKeyPrefix+k.channel, b.instance+"|"+k.identity)
	}
	if _, err := pipe.Exec(ctx); err != nil {
		b.log.Warn("cannot remove this instance's presence from redis; it expires with its liveness key",
			zap.String("instance", b.instance), zap.Error(err))
	}
}

// loadPresenceLibrary loads the presence function library; replace on the
// first load of the process, so that an upgrade takes effect.
func (b *Broker) loadPresenceLibrary(ctx context.Context, replace bool) {
	ctx, cancel := context.WithTimeout(ctx, reloadTimeout)
	defer cancel()
	if err := b.loadCode(ctx, PresenceLibraryName, presenceLibraryCode(), replace); err != nil && b.ctx.Err() == nil {
		b.log.Warn("cannot load the presence function library; will retry", zap.Error(err))
	}
}

// ttlCeil rounds a ttl up to whole seconds, the unit the liveness key's
// expiry is read in by a human.
func ttlCeil(d time.Duration) time.Duration {
	return time.Duration(ttlSeconds(d)) * time.Second
}

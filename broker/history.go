package broker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// History lives in Redis, so that publishing a resumable event is one
// command from any client in any language:
//
//	FCALL sse_publish 1 <channel> <payload> [<maxlen> [<ttl_seconds>]]
//
// The function (library caddy_sse, loaded by EnsureHistory) takes the next
// id from the global counter SeqKey, appends the payload to the channel's
// stream HistoryKeyPrefix+<channel> under that id and publishes it, framed
// as "\x1esse:<id>\x1e<payload>", on the channel's twin
// ResumableChannelPrefix+<channel>, never on the channel itself. Subscribe
// covers both; only what arrives on the twin is unframed. Whatever a plain
// PUBLISH on the channel carries, even bytes that look like a frame, is
// plain data without an id: a backend that relays an end user's text can
// never let it set a resume point. Channel names that start with
// ResumableChannelPrefix are reserved (an ACL on channels must allow the
// twins too). One counter for the whole Redis orders events across
// channels, so a stream on several channels resumes from one Last-Event-ID.
//
// The function also keeps EpochKey: the first id it issued after the
// counter was found missing (the first publish ever, or Redis lost its
// data). A client resuming from an id below it may have missed events that
// no longer exist anywhere, and is told so.
//
// In a Redis Cluster one command can only touch keys of one slot, so every
// history key carries the hash tag {sse}: the counter is ClusterSeqKey, a
// channel's stream ClusterKeyPrefix+<channel>, and the publisher names that
// key (which routes the FCALL to its shard) instead of the channel:
//
//	FCALL sse_publish 1 {sse}:h:<channel> <payload> [<maxlen> [<ttl_seconds>]]
//
// That form works on a single server too. The price is that resumable
// events are all written by one shard and published with PUBLISH, which the
// cluster broadcasts; the gain is one id order across every channel, which
// resume and the registry's duplicate suppression rely on (per-channel
// counters on different shards have no order between them). The
// subscription connection lives on that shard's master and follows the
// slot, so that those events arrive in id order (see clusterSubClient).
//
// An id is never below the server's clock in microseconds: after a
// failover that lost the last writes of the old master, the new master's
// ids still pass every id a client may have seen, so no new event is
// mistaken for one already delivered.

const (
	// LibraryName is the Redis function library EnsureHistory loads.
	LibraryName = "caddy_sse"
	// PublishFunction is the function that publishes a resumable event.
	PublishFunction = "sse_publish"
	// SeqKey is the global event id counter.
	SeqKey = "sse:seq"
	// HistoryKeyPrefix + channel is the stream holding a channel's history.
	HistoryKeyPrefix = "sse:h:"
	// ClusterSeqKey is the event id counter in a Redis Cluster.
	ClusterSeqKey = "{sse}:seq"
	// ClusterKeyPrefix + channel is the key a publisher names in FCALL in a
	// Redis Cluster (accepted everywhere), and there the channel's history.
	ClusterKeyPrefix = "{sse}:h:"
	// EpochKey holds the first id sse_publish issued after it found SeqKey
	// missing: history before it may be lost ("1" when unknown).
	EpochKey = "sse:epoch"
	// ClusterEpochKey is EpochKey in a Redis Cluster.
	ClusterEpochKey = "{sse}:epoch"
	// ResumableChannelPrefix + channel is the channel sse_publish publishes
	// channel's resumable events on. Subscribe subscribes it beside the
	// channel; callers never name it.
	ResumableChannelPrefix = "sse:r:"
	// FramePrefix starts a payload sse_publish publishes on a resumable
	// channel; the id follows in decimal, then FrameSep, then the original
	// payload. On a plain channel it means nothing.
	FramePrefix = "\x1esse:"
	// FrameSep ends the id of a framed payload.
	FrameSep = "\x1e"
)

// library is the Lua source of the function library; the defaults and the
// key names are substituted in by libraryCode.
//
// Each stream entry holds the payload (d) and the previous id on the same
// channel (p). Trimming removes the oldest entries, so the first entry after
// a client's last id tells exactly whether anything in between is gone: its
// p is later than that id. (XINFO's max-deleted-entry-id is not updated by
// trimming, and the first retained id alone cannot tell, ids being global.)
// Trimming is exact (MAXLEN, not MAXLEN ~): with "~" Redis only drops whole
// nodes of 100 entries, and "history 10" would keep up to 110.
const library = `#!lua name=caddy_sse
-- caddy-sse: resumable Server-Sent Events over Redis pub/sub.
-- FCALL sse_publish 1 <channel> <payload> [<maxlen> [<ttl_seconds>]]
-- FCALL sse_publish 1 {sse}:h:<channel> <payload> [<maxlen> [<ttl_seconds>]]
-- (the second form everywhere, and the only one in a Redis Cluster)
-- FCALL sse_publish 1 sse:h{<channel>} <payload> [<maxlen> [<ttl_seconds>]]
-- (sharded mode only: the channel's own history key, see sharded_names)
-- returns the event id. Defaults: maxlen {{MAXLEN}}, ttl_seconds {{TTL}}
-- (0: the history never expires).

local default_maxlen = {{MAXLEN}}
local default_ttl = {{TTL}}
local cluster = {{CLUSTER}}
local sharded = {{SHARDED}}
local seq_key = '{{SEQ}}'
local epoch_key = '{{EPOCH}}'
local history_prefix = '{{HISTORY}}'
local twin_prefix = '{{TWIN}}'
local tagged = '{sse}:h:'

-- Sharded mode (Redis Cluster with sharded pub/sub): ids count per
-- channel, and the history key and the twin channel live in the channel's
-- slot (see shardkeys.go for the names).
local function has_tag(s)
  local i = string.find(s, '{', 1, true)
  if not i then return false end
  local j = string.find(s, '}', i + 1, true)
  return j ~= nil and j > i + 1
end

local function crc16(s)
  local crc = 0
  for i = 1, #s do
    crc = bit.bxor(crc, bit.lshift(string.byte(s, i), 8))
    for _ = 1, 8 do
      if bit.band(crc, 0x8000) ~= 0 then
        crc = bit.band(bit.bxor(bit.lshift(crc, 1), 0x1021), 0xFFFF)
      else
        crc = bit.band(bit.lshift(crc, 1), 0xFFFF)
      end
    end
  end
  return crc
end

local function unstep16(r)
  for _ = 1, 16 do
    if bit.band(r, 1) ~= 0 then
      r = bit.bor(bit.rshift(bit.bxor(r, 0x1021), 1), 0x8000)
    else
      r = bit.rshift(r, 1)
    end
  end
  return r
end

local function tag_byte(b) return b >= 33 and b <= 126 and b ~= 125 end

-- A three-character hash tag for the slot of a channel that holds '}' but
-- no hash tag of its own.
local function slot_tag(slot)
  for p = 33, 126 do
    if p ~= 125 then
      local s = crc16(string.char(p))
      for hi = 0, 3 do
        local b = bit.bxor(s, unstep16(slot + hi * 16384))
        local b1, b2 = bit.rshift(b, 8), bit.band(b, 255)
        if tag_byte(b1) and tag_byte(b2) then return string.char(p, b1, b2) end
      end
    end
  end
end

-- The history key and the twin of a channel.
local function sharded_names(c)
  if has_tag(c) then return 'sse:h:' .. c, 'sse:r:' .. c end
  if not string.find(c, '}', 1, true) then return 'sse:h{' .. c .. '}', 'sse:r{' .. c .. '}' end
  local t = slot_tag(crc16(c) % 16384)
  return 'sse:h~{' .. t .. '}' .. c, 'sse:r~{' .. t .. '}' .. c
end

-- The channel a history key belongs to, or nil.
local function channel_of(key)
  local c
  if string.sub(key, 1, 6) == 'sse:h:' then
    c = string.sub(key, 7)
  elseif string.sub(key, 1, 6) == 'sse:h{' and string.sub(key, -1) == '}' then
    c = string.sub(key, 7, -2)
  elseif string.sub(key, 1, 7) == 'sse:h~{' then
    local j = string.find(key, '}', 8, true)
    if j then c = string.sub(key, j + 1) end
  end
  if c and c ~= '' and sharded_names(c) == key then return c end
  return nil
end

local function publish_sharded(key, payload, maxlen, ttl)
  local channel = channel_of(key)
  if not channel then
    if string.sub(key, 1, 4) == 'sse:' or string.sub(key, 1, 6) == '{sse}:' then
      return redis.error_reply('ERR sse_publish: ' .. key .. ' is not the history key of a channel (sharded mode: FCALL sse_publish 1 <history key> <payload>)')
    end
    return redis.error_reply('ERR sse_publish: sharded mode: name the channel\'s history key, which routes the call to its shard: FCALL sse_publish 1 ' .. sharded_names(key) .. ' <payload>')
  end
  local _, twin = sharded_names(channel)
  -- The id counts per channel: the last id of the channel's stream plus one,
  -- but never below the clock in microseconds, so that ids issued after a
  -- failover lost the last writes still pass every id a client has seen.
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local prev = 0
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if last[1] then prev = tonumber(string.match(last[1][1], '^%d+')) or 0 end
  local seq = prev + 1
  if seq < now then seq = now end
  local id = string.format('%.0f', seq)
  redis.call('XADD', key, 'MAXLEN', string.format('%.0f', maxlen), id .. '-0', 'd', payload, 'p', string.format('%.0f', prev))
  if ttl > 0 then redis.call('EXPIRE', key, string.format('%.0f', ttl)) end
  redis.call('SPUBLISH', twin, '\30sse:' .. id .. '\30' .. payload)
  return seq
end

local function sse_publish(keys, args)
  if #keys ~= 1 or #args < 1 or #args > 3 then
    return redis.error_reply('ERR usage: FCALL sse_publish 1 <channel> <payload> [<maxlen> [<ttl_seconds>]]')
  end
  local maxlen, ttl = default_maxlen, default_ttl
  if args[2] ~= nil then maxlen = tonumber(args[2]) end
  if args[3] ~= nil then ttl = tonumber(args[3]) end
  if maxlen == nil or maxlen < 1 or maxlen ~= math.floor(maxlen) then
    return redis.error_reply('ERR sse_publish: maxlen must be a positive integer')
  end
  if ttl == nil or ttl < 0 or ttl ~= math.floor(ttl) then
    return redis.error_reply('ERR sse_publish: ttl_seconds must be a non-negative integer')
  end
  if sharded then return publish_sharded(keys[1], args[1], maxlen, ttl) end
  local channel, payload = keys[1], args[1]
  if string.sub(channel, 1, #tagged) == tagged then
    channel = string.sub(channel, #tagged + 1)
  elseif cluster then
    return redis.error_reply('ERR sse_publish: in a Redis Cluster name the history key, not the channel: FCALL sse_publish 1 {sse}:h:<channel> <payload>')
  end
  if string.sub(channel, 1, #twin_prefix) == twin_prefix then
    return redis.error_reply('ERR sse_publish: channel names starting with ' .. twin_prefix .. ' are reserved')
  end

  -- The id is the counter plus one, but never below the clock in
  -- microseconds (Redis keeps it exact up to 2^53).
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local seq = redis.call('INCR', seq_key)
  local fresh = seq == 1
  if seq < now then
    seq = now
    redis.call('SET', seq_key, string.format('%.0f', now))
  end
  local id = string.format('%.0f', seq)
  if fresh then
    -- The counter was missing: the first publish, or Redis lost its data.
    -- Whatever had an id below this one cannot be replayed.
    redis.call('SET', epoch_key, id)
  else
    -- Upgraded from a library without the epoch: no loss is known.
    redis.call('SET', epoch_key, '1', 'NX')
  end

  local key = history_prefix .. channel
  local prev = '0'
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if last[1] then prev = string.match(last[1][1], '^%d+') or '0' end
  -- Numbers are formatted by hand: Lua would write 1e+15.
  redis.call('XADD', key, 'MAXLEN', string.format('%.0f', maxlen), id .. '-0', 'd', payload, 'p', prev)
  if ttl > 0 then redis.call('EXPIRE', key, string.format('%.0f', ttl)) end
  -- On the twin only: a frame on the channel itself is never trusted.
  redis.call('PUBLISH', twin_prefix .. channel, '\30sse:' .. id .. '\30' .. payload)
  return seq
end

redis.register_function('sse_publish', sse_publish)
`

func libraryCode(r Retention, cluster, sharded bool) string {
	seq, hist, epoch := SeqKey, HistoryKeyPrefix, EpochKey
	if cluster {
		seq, hist, epoch = ClusterSeqKey, ClusterKeyPrefix, ClusterEpochKey
	}
	return strings.NewReplacer(
		"{{MAXLEN}}", strconv.FormatInt(r.MaxLen, 10),
		"{{TTL}}", strconv.FormatInt(ttlSeconds(r.TTL), 10),
		"{{CLUSTER}}", strconv.FormatBool(cluster),
		"{{SHARDED}}", strconv.FormatBool(sharded),
		"{{SEQ}}", seq,
		"{{EPOCH}}", epoch,
		"{{HISTORY}}", hist,
		"{{TWIN}}", ResumableChannelPrefix,
	).Replace(library)
}

// historyKey is the key holding channel's history.
func (b *Broker) historyKey(channel string) string {
	if b.sharded {
		return ShardedHistoryKey(channel)
	}
	if b.cluster != nil {
		return ClusterKeyPrefix + channel
	}
	return HistoryKeyPrefix + channel
}

// history is what this process baked into the library.
type history struct {
	mu     sync.Mutex
	loaded bool      // EnsureHistory loaded the library at least once
	ret    Retention // the defaults baked in: the largest seen
}

// EnsureHistory makes sure the function library is loaded in Redis, with
// defaults (for FCALLs that give no maxlen/ttl) of the largest retention
// this process has seen. The first call of the process, and any call that
// raises the retention, replaces the library; later calls load it only if
// Redis lost it (a restart without persistence). r.MaxLen == 0 does nothing.
// Safe to call often: it costs one round trip.
func (b *Broker) EnsureHistory(ctx context.Context, r Retention) error {
	if err := r.validate(); err != nil {
		return fmt.Errorf("broker: history: %w", err)
	}
	if r.MaxLen == 0 {
		return nil
	}
	b.hist.mu.Lock()
	defer b.hist.mu.Unlock()
	merged := r
	if b.hist.loaded {
		merged = b.hist.ret.merge(r)
	}
	if err := b.loadLibrary(ctx, merged, !b.hist.loaded || merged != b.hist.ret); err != nil {
		return err
	}
	b.hist.loaded, b.hist.ret = true, merged
	return nil
}

// reloadHistory loads the library again after a reconnect if this process
// ever loaded it.
func (b *Broker) reloadHistory() {
	b.hist.mu.Lock()
	defer b.hist.mu.Unlock()
	if !b.hist.loaded {
		return
	}
	ctx, cancel := context.WithTimeout(b.ctx, reloadTimeout)
	defer cancel()
	if err := b.loadLibrary(ctx, b.hist.ret, false); err != nil && b.ctx.Err() == nil {
		b.log.Warn("cannot reload the history function library after reconnecting", zap.Error(err))
	}
}

// checkLibrary is the library check goroutine (see Options.LibraryCheck).
// It ends with the broker.
func (b *Broker) checkLibrary() {
	if b.libEvery <= 0 {
		return
	}
	t := time.NewTicker(b.libEvery)
	defer t.Stop()
	failing := false // the last reload failed and was logged
	for {
		select {
		case <-b.ctx.Done():
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(b.ctx, reloadTimeout)
		err := b.restoreLibrary(ctx)
		cancel()
		switch {
		case err != nil && !failing && b.ctx.Err() == nil:
			b.log.Warn("the history function library is missing from Redis and cannot be loaded again; retrying", zap.Error(err))
			failing = true
		case err == nil:
			failing = false
		}
	}
}

// restoreLibrary loads a function library again if this process loaded
// (history) or wants (presence) it and Redis no longer has it. A failure to
// ask is not reported: Redis is down, which the subscription connection
// reports.
func (b *Broker) restoreLibrary(ctx context.Context) error {
	b.hist.mu.Lock()
	defer b.hist.mu.Unlock()
	history, presence := b.hist.loaded, b.presOn.Load()
	if !history && !presence {
		return nil
	}
	if b.sharded {
		return b.restoreSharded(ctx, history, presence)
	}
	var c redis.Cmdable = b.client
	if b.cluster != nil {
		m, err := b.cluster.MasterForKey(ctx, ClusterSeqKey)
		if err != nil {
			return nil
		}
		c = m
	}
	// One command for both libraries: their names share the prefix.
	libs, err := c.FunctionList(ctx, redis.FunctionListQuery{LibraryNamePattern: LibraryName + "*"}).Result()
	if err != nil {
		return nil
	}
	have := make(map[string]bool, len(libs))
	for _, l := range libs {
		have[l.Name] = true
	}
	if history && !have[LibraryName] {
		if err := b.loadLibrary(ctx, b.hist.ret, false); err != nil {
			return err
		}
		b.log.Warn("the history function library was missing from Redis (FUNCTION FLUSH, or a failover to a node without it); loaded it again",
			zap.String("library", LibraryName))
	}
	if presence && !have[PresenceLibraryName] {
		if err := b.loadCode(ctx, PresenceLibraryName, presenceLibraryCode(), false); err != nil {
			return err
		}
		b.log.Warn("the presence function library was missing from Redis (FUNCTION FLUSH, or a failover to a node without it); loaded it again",
			zap.String("library", PresenceLibraryName))
	}
	return nil
}

// restoreSharded is restoreLibrary in sharded mode, where every master
// needs the history library: a master that lacks it (a node added to the
// cluster, a FUNCTION FLUSH) gets it. The presence library lives on the
// {sse} slot's master, as in cluster mode.
func (b *Broker) restoreSharded(ctx context.Context, history, presence bool) error {
	var missing atomic.Bool
	if history {
		_ = b.cluster.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error {
			libs, err := c.FunctionList(ctx, redis.FunctionListQuery{LibraryNamePattern: LibraryName}).Result()
			if err == nil && len(libs) == 0 {
				missing.Store(true)
			}
			return nil
		})
	}
	if missing.Load() {
		if err := b.loadLibrary(ctx, b.hist.ret, false); err != nil {
			return err
		}
		b.log.Warn("the history function library was missing from a Redis master (FUNCTION FLUSH, a new node); loaded it again",
			zap.String("library", LibraryName))
	}
	if !presence {
		return nil
	}
	m, err := b.cluster.MasterForKey(ctx, ClusterSeqKey)
	if err != nil {
		return nil
	}
	libs, err := m.FunctionList(ctx, redis.FunctionListQuery{LibraryNamePattern: PresenceLibraryName}).Result()
	if err != nil || len(libs) > 0 {
		return nil
	}
	if err := b.loadCode(ctx, PresenceLibraryName, presenceLibraryCode(), false); err != nil {
		return err
	}
	b.log.Warn("the presence function library was missing from Redis; loaded it again",
		zap.String("library", PresenceLibraryName))
	return nil
}

func (b *Broker) loadLibrary(ctx context.Context, r Retention, replace bool) error {
	if err := b.loadCode(ctx, LibraryName, libraryCode(r, b.cluster != nil, b.sharded), replace); err != nil {
		return fmt.Errorf("%w (history %d, ttl %s)", err, r.MaxLen, r.TTL)
	}
	return nil
}

// loadCode loads the function library name from code, replacing the one
// Redis has if replace is set.
func (b *Broker) loadCode(ctx context.Context, name, code string, replace bool) error {
	load := func(ctx context.Context, c redis.Cmdable) error {
		if replace {
			return c.FunctionLoadReplace(ctx, code).Err()
		}
		err := c.FunctionLoad(ctx, code).Err()
		if err != nil && strings.Contains(err.Error(), "already exists") {
			err = nil
		}
		return err
	}
	var err error
	switch {
	case b.sharded:
		// Every master publishes resumable events of its channels: each
		// must have the library (its replicas get it from it).
		err = b.topology(ctx, func() error {
			return b.cluster.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error {
				return load(ctx, c)
			})
		})
	case b.cluster != nil:
		// Functions live per node. The master of the {sse} slot must have
		// the library (its replicas get it from it); the other masters get
		// it too, best effort, so that it is there if resharding moves the
		// slot to one of them.
		err = b.topology(ctx, func() error {
			m, err := b.cluster.MasterForKey(ctx, ClusterSeqKey)
			if err == nil {
				err = load(ctx, m)
			}
			return err
		})
		if err == nil {
			_ = b.cluster.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error {
				return load(ctx, c)
			})
		}
	default:
		err = load(ctx, b.client)
	}
	if err != nil {
		return fmt.Errorf("broker: load redis function library %s: %w", name, err)
	}
	return nil
}

// Publish publishes payload on channel. With r.MaxLen == 0 it is a plain
// PUBLISH and returns 0; otherwise it calls sse_publish with r's retention
// and returns the event's id, loading the library first if Redis lost it.
func (b *Broker) Publish(ctx context.Context, channel string, payload []byte, r Retention) (seq uint64, err error) {
	if err := r.validate(); err != nil {
		return 0, fmt.Errorf("publish on %q: %w", channel, err)
	}
	if b.reserved(channel) {
		return 0, fmt.Errorf("publish on %q: %w", channel, b.reservedErr())
	}
	if r.MaxLen == 0 {
		publish := b.client.Publish
		if b.sharded {
			publish = b.client.SPublish
		}
		if err := b.topology(ctx, func() error { return publish(ctx, channel, payload).Err() }); err != nil {
			return 0, fmt.Errorf("publish on %q: %w", channel, err)
		}
		return 0, nil
	}
	seq, err = b.publishHistory(ctx, channel, payload, r)
	if err != nil && isNoFunction(err) {
		if lerr := b.EnsureHistory(ctx, r); lerr != nil {
			return 0, fmt.Errorf("publish on %q: %w", channel, lerr)
		}
		seq, err = b.publishHistory(ctx, channel, payload, r)
	}
	if err != nil {
		return 0, fmt.Errorf("publish on %q: %w", channel, err)
	}
	return seq, nil
}

func (b *Broker) publishHistory(ctx context.Context, channel string, payload []byte, r Retention) (uint64, error) {
	key := channel
	switch {
	case b.sharded:
		key = ShardedHistoryKey(channel)
	case b.cluster != nil:
		key = ClusterKeyPrefix + channel
	}
	var n int64
	err := b.topology(ctx, func() (err error) {
		n, err = b.client.FCall(ctx, PublishFunction, []string{key},
			payload, r.MaxLen, ttlSeconds(r.TTL)).Int64()
		return err
	})
	if err != nil {
		return 0, err
	}
	if n <= 0 {
		return 0, fmt.Errorf("%s returned id %d", PublishFunction, n)
	}
	return uint64(n), nil
}

// DefaultPageSize is ReplayPage's count when it is given none.
const DefaultPageSize = 128

// replayPageSize is the page Replay reads at a time: it collects all of
// them anyway, so larger pages only save round trips.
const replayPageSize = 1024

// Replay returns everything the history of channels holds after id after,
// merged in id order, read page by page. Its memory grows with the
// history: a client's resume reads with ReplayPage instead and writes each
// page before it reads the next. A channel without history contributes
// nothing and is not truncated.
func (b *Broker) Replay(ctx context.Context, channels []string, after uint64) (Replay, error) {
	if b.sharded {
		channels = dedupe(channels)
		return b.ReplayChannelsAll(ctx, channels, samePosition(after, len(channels)))
	}
	var rp Replay
	for {
		pg, err := b.ReplayPage(ctx, channels, after, replayPageSize)
		if err != nil {
			return Replay{}, err
		}
		rp.Messages = append(rp.Messages, pg.Messages...)
		rp.Truncated = rp.Truncated || pg.Truncated
		if !pg.More {
			return rp, nil
		}
		after = pg.Next
	}
}

// ReplayPage reads one page of what the history of channels holds after id
// after, in one round trip: at most count entries per channel (count <= 0:
// DefaultPageSize), so a page holds at most count*len(channels) messages.
// When a channel fills its count, what it holds beyond its last entry is
// unread, so the page ends at the smallest such last entry, and every other
// channel's later entries wait for the next page.
func (b *Broker) ReplayPage(ctx context.Context, channels []string, after uint64, count int64) (Page, error) {
	if count <= 0 {
		count = DefaultPageSize
	}
	channels = dedupe(channels)
	if len(channels) == 0 || after == math.MaxUint64 {
		return Page{Next: after}, nil
	}
	if b.sharded {
		// Ids count per channel: the same position on each.
		cp, err := b.ReplayChannels(ctx, channels, samePosition(after, len(channels)), count)
		if err != nil {
			return Page{}, err
		}
		return Page{Messages: cp.Messages, Truncated: cp.Truncated, More: cp.More, Next: after}, nil
	}
	start := strconv.FormatUint(after+1, 10) // XRANGE takes "n" as "n-0"
	cmds := make([]*redis.XMessageSliceCmd, len(channels))
	var marks *redis.SliceCmd
	err := b.topology(ctx, func() error {
		pipe := b.client.Pipeline()
		for i, c := range channels {
			cmds[i] = pipe.XRangeN(ctx, b.historyKey(c), start, "+", count)
		}
		marks = pipe.MGet(ctx, b.epochKeys()...)
		_, err := pipe.Exec(ctx)
		return err
	})
	if err != nil {
		return Page{}, fmt.Errorf("replay %q after %d: %w", channels, after, err)
	}
	pg := Page{Next: after, Truncated: lost(after, marks.Val())}
	if err := pg.end(channels, cmds, count); err != nil {
		return Page{}, err
	}
	if err := pg.collect(channels, cmds, after); err != nil {
		return Page{}, err
	}
	if n := len(pg.Messages); !pg.More && n > 0 {
		pg.Next = pg.Messages[n-1].Seq
	}
	return pg, nil
}

// end sets where the page ends: at the smallest last entry of the channels
// that filled their count (what they hold beyond it is unread), More if
// there is one.
func (pg *Page) end(channels []string, cmds []*redis.XMessageSliceCmd, count int64) error {
	for i, cmd := range cmds {
		entries := cmd.Val()
		if int64(len(entries)) != count {
			continue
		}
		last, err := parseID(entries[len(entries)-1].ID)
		if err != nil {
			return fmt.Errorf("replay %q: history entry %s: %w", channels[i], entries[len(entries)-1].ID, err)
		}
		if !pg.More || last < pg.Next {
			pg.Next, pg.More = last, true
		}
	}
	return nil
}

// collect adds the entries read up to the page's end, in Seq order, and
// marks the page truncated where a channel's first entry follows one
// after the id asked for.
func (pg *Page) collect(channels []string, cmds []*redis.XMessageSliceCmd, after uint64) error {
	for i, cmd := range cmds {
		for j, e := range cmd.Val() {
			seq, err := parseID(e.ID)
			if err != nil {
				return fmt.Errorf("replay %q: history entry %s: %w", channels[i], e.ID, err)
			}
			if j == 0 && entryPrev(e) > after {
				pg.Truncated = true
			}
			if pg.More && seq > pg.Next {
				break
			}
			d, _ := e.Values["d"].(string)
			pg.Messages = append(pg.Messages, Message{Channel: channels[i], Payload: []byte(d), Seq: seq})
		}
	}
	if len(channels) > 1 {
		slices.SortFunc(pg.Messages, func(x, y Message) int { return cmp.Compare(x.Seq, y.Seq) })
	}
	return nil
}

// samePosition is n positions, all after: a position shared by n channels
// whose ids count per channel.
func samePosition(after uint64, n int) []uint64 {
	from := make([]uint64, n)
	for i := range from {
		from[i] = after
	}
	return from
}

// ChannelsPage is one page of history read by ReplayChannels.
type ChannelsPage struct {
	// Messages are, for each channel, its retained messages after its
	// position, in id order; channels are interleaved by id (which, ids
	// being at least the publish time in microseconds, is about the order
	// of publishing).
	Messages []Message
	// Truncated is true when some history of a channel between its
	// position and its first message is gone (trimmed): the client may
	// have missed some.
	Truncated bool
	// More is true when some channel filled the page: read again from the
	// positions of the last messages.
	More bool
}

// ReplayChannels reads one page of the history of channels whose ids count
// per channel (sharded mode), after[i] being the position of channels[i]:
// at most count entries per channel (count <= 0: DefaultPageSize), in one
// round trip per shard. A position of 0 asks for everything retained, and
// is never truncated; nor is a channel without history (its key expired
// after its TTL without a publish, so nothing was missed).
func (b *Broker) ReplayChannels(ctx context.Context, channels []string, after []uint64, count int64) (ChannelsPage, error) {
	var pg ChannelsPage
	if len(after) != len(channels) {
		return pg, fmt.Errorf("replay: %d positions for %d channels", len(after), len(channels))
	}
	if count <= 0 {
		count = DefaultPageSize
	}
	cmds := make([]*redis.XMessageSliceCmd, len(channels))
	err := b.topology(ctx, func() error {
		pipe := b.client.Pipeline()
		for i, c := range channels {
			if after[i] == math.MaxUint64 {
				continue
			}
			cmds[i] = pipe.XRangeN(ctx, b.historyKey(c), strconv.FormatUint(after[i]+1, 10), "+", count)
		}
		_, err := pipe.Exec(ctx)
		return err
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return ChannelsPage{}, fmt.Errorf("replay %q: %w", channels, err)
	}
	for i, cmd := range cmds {
		if cmd == nil {
			continue
		}
		entries := cmd.Val()
		if int64(len(entries)) == count {
			pg.More = true
		}
		for j, e := range entries {
			seq, err := parseID(e.ID)
			if err != nil {
				return ChannelsPage{}, fmt.Errorf("replay %q: history entry %s: %w", channels[i], e.ID, err)
			}
			if j == 0 && after[i] > 0 && entryPrev(e) > after[i] {
				pg.Truncated = true
			}
			d, _ := e.Values["d"].(string)
			pg.Messages = append(pg.Messages, Message{Channel: channels[i], Payload: []byte(d), Seq: seq})
		}
	}
	if len(channels) > 1 {
		slices.SortStableFunc(pg.Messages, func(x, y Message) int { return cmp.Compare(x.Seq, y.Seq) })
	}
	return pg, nil
}

// ReplayChannelsAll is ReplayChannels read to the end, page by page. Its
// memory grows with the history: it serves the catch-up after a
// reconnect, which delivers what it reads to every stream at once.
func (b *Broker) ReplayChannelsAll(ctx context.Context, channels []string, after []uint64) (Replay, error) {
	var rp Replay
	from := slices.Clone(after)
	index := make(map[string]int, len(channels))
	for i, c := range channels {
		index[c] = i
	}
	for {
		pg, err := b.ReplayChannels(ctx, channels, from, replayPageSize)
		if err != nil {
			return Replay{}, err
		}
		rp.Messages = append(rp.Messages, pg.Messages...)
		rp.Truncated = rp.Truncated || pg.Truncated
		if !pg.More {
			slices.SortStableFunc(rp.Messages, func(x, y Message) int { return cmp.Compare(x.Seq, y.Seq) })
			return rp, nil
		}
		for _, m := range pg.Messages {
			if i := index[m.Channel]; m.Seq > from[i] {
				from[i] = m.Seq
			}
		}
	}
}

// Heads returns the id of the newest event in the history of each channel
// (0 for none), in sharded mode where ids count per channel: a stream that
// starts now has seen everything up to it. One round trip per shard.
func (b *Broker) Heads(ctx context.Context, channels []string) ([]uint64, error) {
	cmds := make([]*redis.XMessageSliceCmd, len(channels))
	err := b.topology(ctx, func() error {
		pipe := b.client.Pipeline()
		for i, c := range channels {
			cmds[i] = pipe.XRevRangeN(ctx, b.historyKey(c), "+", "-", 1)
		}
		_, err := pipe.Exec(ctx)
		return err
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("read the history heads of %q: %w", channels, err)
	}
	heads := make([]uint64, len(channels))
	for i, cmd := range cmds {
		if e := cmd.Val(); len(e) > 0 {
			h, err := parseID(e[0].ID)
			if err != nil {
				return nil, fmt.Errorf("history entry %s of %q: %w", e[0].ID, channels[i], err)
			}
			heads[i] = h
		}
	}
	return heads, nil
}

// epochKeys are the epoch and the counter, in the order lost reads them.
// They share the {sse} slot in a cluster, so one MGET reads both.
func (b *Broker) epochKeys() []string {
	if b.cluster != nil {
		return []string{ClusterEpochKey, ClusterSeqKey}
	}
	return []string{EpochKey, SeqKey}
}

// lost reports whether events after id after may be gone with data Redis
// lost, from the values of epochKeys: after is below the epoch, or neither
// the epoch nor the counter exists (everything lost, nothing published
// since). after == 0 asks for whatever is retained and is never told so.
func lost(after uint64, marks []any) bool {
	if after == 0 || len(marks) != 2 {
		return false
	}
	epoch, _ := marks[0].(string)
	if epoch == "" {
		return marks[1] == nil
	}
	e, err := strconv.ParseUint(epoch, 10, 64)
	return err == nil && after < e
}

// entryPrev is an entry's previous id on its channel; 0 when unknown (an
// entry not written by sse_publish), which never claims truncation.
func entryPrev(e redis.XMessage) uint64 {
	s, _ := e.Values["p"].(string)
	p, _ := strconv.ParseUint(s, 10, 64)
	return p
}

// parseID reads the event id out of a stream id "<seq>-0".
func parseID(id string) (uint64, error) {
	ms, _, _ := strings.Cut(id, "-")
	return strconv.ParseUint(ms, 10, 64)
}

// twinOf is the twin of a caller's channel.
func (b *Broker) twinOf(channel string) string {
	if b.sharded {
		return shardedTwin(channel)
	}
	return ResumableChannelPrefix + channel
}

// channelOfTwin is the channel whose twin name is, if it is one.
func (b *Broker) channelOfTwin(name string) (string, bool) {
	if b.sharded {
		return channelOfTwin(name)
	}
	return strings.CutPrefix(name, ResumableChannelPrefix)
}

// reserved reports whether a caller may not name channel: it would be
// taken for another channel's twin (in sharded mode, every sse: name is
// the module's).
func (b *Broker) reserved(channel string) bool {
	if b.sharded {
		return strings.HasPrefix(channel, ShardedReservedPrefix)
	}
	return strings.HasPrefix(channel, ResumableChannelPrefix)
}

// reservedErr is ErrReservedChannel, saying which names are reserved.
func (b *Broker) reservedErr() error {
	if b.sharded {
		return fmt.Errorf("%w (in sharded mode, every name starting with %s)", ErrReservedChannel, ShardedReservedPrefix)
	}
	return ErrReservedChannel
}

// unframe splits "\x1esse:<seq>\x1e<body>". Anything else, including a
// payload that only starts like a frame, is not a frame.
func unframe(p string) (seq uint64, body string, ok bool) {
	rest, found := strings.CutPrefix(p, FramePrefix)
	if !found {
		return 0, "", false
	}
	digits, body, found := strings.Cut(rest, FrameSep)
	if !found || digits == "" || len(digits) > 20 {
		return 0, "", false
	}
	for i := 0; i < len(digits); i++ {
		if digits[i] < '0' || digits[i] > '9' {
			return 0, "", false
		}
	}
	seq, err := strconv.ParseUint(digits, 10, 64)
	if err != nil || seq == 0 {
		return 0, "", false
	}
	return seq, body, true
}

// topology runs fn and, in a cluster, runs it again while it fails because
// a node is gone or the cluster is reconfiguring: go-redis keeps routing to
// a failed master until its view of the slots is reloaded, which is asked
// for here. It gives up when ctx ends.
func (b *Broker) topology(ctx context.Context, fn func() error) error {
	err := fn()
	for b.cluster != nil && err != nil && retryable(err) {
		b.cluster.ReloadState(ctx)
		t := time.NewTimer(topologyRetry)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
		err = fn()
	}
	return err
}

// topologyRetry is the pause before a cluster command is tried again.
const topologyRetry = 200 * time.Millisecond

// retryable tells a failure that a new view of the cluster may cure: a
// network error or a cluster that is reconfiguring, not a refusal.
func retryable(err error) bool {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, redis.ErrClosed) {
		return false
	}
	var rerr redis.Error
	if errors.As(err, &rerr) {
		msg := rerr.Error()
		return strings.HasPrefix(msg, "CLUSTERDOWN") || strings.HasPrefix(msg, "TRYAGAIN") || strings.HasPrefix(msg, "MASTERDOWN")
	}
	return true
}

func isNoFunction(err error) bool {
	return err != nil && strings.Contains(err.Error(), "Function not found")
}

func (r Retention) validate() error {
	if r.MaxLen < 0 {
		return fmt.Errorf("negative history length %d", r.MaxLen)
	}
	if r.TTL < 0 {
		return fmt.Errorf("negative history ttl %s", r.TTL)
	}
	return nil
}

// merge is the larger of two retentions; a TTL of 0 (never expire) is the
// largest.
func (r Retention) merge(o Retention) Retention {
	m := Retention{MaxLen: max(r.MaxLen, o.MaxLen), TTL: max(r.TTL, o.TTL)}
	if r.TTL == 0 || o.TTL == 0 {
		m.TTL = 0
	}
	return m
}

// ttlSeconds rounds up to whole seconds, the unit of EXPIRE.
func ttlSeconds(d time.Duration) int64 {
	if d <= 0 {
		return 0
	}
	return int64((d + time.Second - 1) / time.Second)
}

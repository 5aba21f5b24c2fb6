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
-- returns the event id. Defaults: maxlen {{MAXLEN}}, ttl_seconds {{TTL}}
-- (0: the history never expires).

local default_maxlen = {{MAXLEN}}
local default_ttl = {{TTL}}
local cluster = {{CLUSTER}}
local seq_key = '{{SEQ}}'
local epoch_key = '{{EPOCH}}'
local history_prefix = '{{HISTORY}}'
local twin_prefix = '{{TWIN}}'
local tagged = '{sse}:h:'

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

func libraryCode(r Retention, cluster bool) string {
	seq, hist, epoch := SeqKey, HistoryKeyPrefix, EpochKey
	if cluster {
		seq, hist, epoch = ClusterSeqKey, ClusterKeyPrefix, ClusterEpochKey
	}
	return strings.NewReplacer(
		"{{MAXLEN}}", strconv.FormatInt(r.MaxLen, 10),
		"{{TTL}}", strconv.FormatInt(ttlSeconds(r.TTL), 10),
		"{{CLUSTER}}", strconv.FormatBool(cluster),
		"{{SEQ}}", seq,
		"{{EPOCH}}", epoch,
		"{{HISTORY}}", hist,
		"{{TWIN}}", ResumableChannelPrefix,
	).Replace(library)
}

// historyKey is the key holding channel's history.
func (b *Broker) historyKey(channel string) string {
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
	defer close(b.libDone)
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

func (b *Broker) loadLibrary(ctx context.Context, r Retention, replace bool) error {
	if err := b.loadCode(ctx, LibraryName, libraryCode(r, b.cluster != nil), replace); err != nil {
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
	if b.cluster != nil {
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
	} else {
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
	if reserved(channel) {
		return 0, fmt.Errorf("publish on %q: %w", channel, ErrReservedChannel)
	}
	if r.MaxLen == 0 {
		if err := b.topology(ctx, func() error { return b.client.Publish(ctx, channel, payload).Err() }); err != nil {
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
	if b.cluster != nil {
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
	pg := Page{Next: after}
	channels = dedupe(channels)
	if len(channels) == 0 || after == math.MaxUint64 {
		return pg, nil
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
	pg.Truncated = lost(after, marks.Val())
	for i, cmd := range cmds {
		if entries := cmd.Val(); int64(len(entries)) == count {
			last, err := parseID(entries[len(entries)-1].ID)
			if err != nil {
				return Page{}, fmt.Errorf("replay %q: history entry %s: %w", channels[i], entries[len(entries)-1].ID, err)
			}
			if !pg.More || last < pg.Next {
				pg.Next, pg.More = last, true
			}
		}
	}
	for i, cmd := range cmds {
		for j, e := range cmd.Val() {
			seq, err := parseID(e.ID)
			if err != nil {
				return Page{}, fmt.Errorf("replay %q: history entry %s: %w", channels[i], e.ID, err)
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
	if n := len(pg.Messages); !pg.More && n > 0 {
		pg.Next = pg.Messages[n-1].Seq
	}
	return pg, nil
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
func twinOf(channel string) string { return ResumableChannelPrefix + channel }

// reserved reports whether a caller may not name channel: it would be
// taken for another channel's twin.
func reserved(channel string) bool { return strings.HasPrefix(channel, ResumableChannelPrefix) }

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

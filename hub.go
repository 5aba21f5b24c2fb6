package caddysse

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/caddy-sse/caddy-sse/broker"
	"github.com/caddy-sse/caddy-sse/registry"
)

// hubs shares one hub per Redis configuration across config loads, so that a
// reload with the same Redis keeps every stream and subscription.
var hubs = caddy.NewUsagePool()

// hub is a registry with the broker that feeds it.
type hub struct {
	reg    *registry.Registry
	brk    *broker.Broker
	logger *zap.Logger

	mu        sync.Mutex
	retention broker.Retention // the largest any config asked for
}

// acquireHub returns the hub for cfg, creating it on first use, and the key
// to release it with. The hub outlives the config that created it, so it
// logs under one name of its own rather than that config's module.
func acquireHub(cfg *RedisConfig) (*hub, string, error) {
	logger := caddy.Log().Named("sse.redis")
	opts, cluster, err := cfg.options()
	if err != nil {
		return nil, "", err
	}
	sharded := cfg != nil && cfg.Sharded
	keyJSON, err := json.Marshal([]any{opts.Addrs, opts.MasterName, opts.Username,
		opts.Password, opts.DB, opts.TLSConfig != nil, cluster, sharded})
	if err != nil {
		return nil, "", fmt.Errorf("redis: %w", err)
	}
	key := string(keyJSON)
	v, _, err := hubs.LoadOrNew(key, func() (caddy.Destructor, error) {
		return newHub(opts, cluster, sharded, logger)
	})
	if err != nil {
		return nil, "", err
	}
	return v.(*hub), key, nil
}

func releaseHub(key string) error {
	_, err := hubs.Delete(key)
	return err
}

func newHub(opts *redis.UniversalOptions, cluster, sharded bool, logger *zap.Logger) (*hub, error) {
	redisLogger.Do(func() { redis.SetLogger(goRedisLogger{logger.Named("go-redis")}) })
	src := &brokerSource{sharded: sharded}
	reg := registry.New(src, logger, registry.Metrics{
		Dropped: metrics.dropped,
		Faults:  metrics.faults,
	})
	brk, err := broker.New(broker.Options{
		Redis:    opts,
		Cluster:  cluster,
		Sharded:  sharded,
		Logger:   logger,
		Instance: instanceID(),
		Metrics: broker.Metrics{
			Connected:        metrics.redisConnected,
			Reconnects:       metrics.redisReconnects,
			Channels:         metrics.channels,
			Received:         metrics.received,
			Rejected:         metrics.rejected,
			PresenceFailures: metrics.presenceFailures,
			LifecycleDropped: metrics.lifecycleDropped,
		},
	}, brokerSink{reg})
	if err != nil {
		reg.Close()
		return nil, fmt.Errorf("redis: %w", err)
	}
	src.b = brk
	h := &hub{reg: reg, brk: brk, logger: logger}
	reg.OnClose = h.markClosed
	watchExit()
	return h, nil
}

// wantHistory makes sure Redis keeps at least r for resumable publishing.
// It does not wait for Redis: Provision must stay fast.
func (h *hub) wantHistory(r broker.Retention) {
	h.mu.Lock()
	changed := false
	if r.MaxLen > h.retention.MaxLen {
		h.retention.MaxLen, changed = r.MaxLen, true
	}
	if r.TTL > h.retention.TTL {
		h.retention.TTL, changed = r.TTL, true
	}
	want := h.retention
	h.mu.Unlock()
	if !changed {
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := h.brk.EnsureHistory(ctx, want); err != nil {
			h.logger.Warn("installing the history functions in Redis failed; will retry on reconnect",
				zap.Error(err))
		}
	}()
}

// markClosed records in Redis that a publisher ended channel, so that
// reconnecting clients on any instance get 204. It runs on the delivering
// goroutine, so the Redis call goes to the background.
func (h *hub) markClosed(channel string) {
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := h.brk.MarkClosed(ctx, channel); err != nil {
			h.logger.Warn("cannot mark channel closed", zap.String("channel", channel), zap.Error(err))
		}
	}()
}

// openChannels returns the channels a publisher has not ended. While Redis
// cannot tell, every channel is served.
func (h *hub) openChannels(ctx context.Context, channels []string) []string {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	closed, err := h.brk.Closed(ctx, channels)
	if err != nil {
		h.logger.Debug("cannot check for closed channels", zap.Error(err))
		return channels
	}
	if len(closed) == 0 {
		return channels
	}
	open := make([]string, 0, len(channels)-len(closed))
	for _, c := range channels {
		if !contains(closed, c) {
			open = append(open, c)
		}
	}
	return open
}

// Destruct runs when the last config using this Redis is unloaded.
func (h *hub) Destruct() error {
	if caddy.Exiting() {
		// Caddy does not wait for taken-over connections: let their
		// jittered ends run first, so that clients do not all reconnect
		// at the same instant.
		detachedStreams.wait(exitJitter + 250*time.Millisecond)
	}
	h.reg.Close()
	return h.brk.Close()
}

// brokerSource adapts the broker to the registry's Source (and, in sharded
// mode, ChannelSource).
type brokerSource struct {
	b       *broker.Broker
	sharded bool
}

func (s *brokerSource) PerChannel() bool { return s.sharded }

func (s *brokerSource) Heads(ctx context.Context, channels []string) ([]uint64, error) {
	return s.b.Heads(ctx, channels)
}

func (s *brokerSource) ReplayChannels(ctx context.Context, channels []string, after []uint64, count int64) (registry.Page, error) {
	p, err := s.b.ReplayChannels(ctx, channels, after, count)
	if err != nil {
		return registry.Page{}, err
	}
	return registry.Page{Messages: toRegistry(p.Messages), Truncated: p.Truncated, More: p.More}, nil
}

func (s *brokerSource) ReplayChannelsAll(ctx context.Context, channels []string, after []uint64) ([]registry.Message, bool, error) {
	rep, err := s.b.ReplayChannelsAll(ctx, channels, after)
	if err != nil {
		return nil, false, err
	}
	return toRegistry(rep.Messages), rep.Truncated, nil
}

func toRegistry(ms []broker.Message) []registry.Message {
	out := make([]registry.Message, len(ms))
	for i, m := range ms {
		out[i] = registry.Message(m)
	}
	return out
}

func (s *brokerSource) Subscribe(ctx context.Context, channels ...string) error {
	return s.b.Subscribe(ctx, channels...)
}

func (s *brokerSource) Unsubscribe(channels ...string) { s.b.Unsubscribe(channels...) }

func (s *brokerSource) Replay(ctx context.Context, channels []string, after uint64) ([]registry.Message, bool, error) {
	rep, err := s.b.Replay(ctx, channels, after)
	if err != nil {
		return nil, false, err
	}
	msgs := make([]registry.Message, len(rep.Messages))
	for i, m := range rep.Messages {
		msgs[i] = registry.Message(m)
	}
	return msgs, rep.Truncated, nil
}

func (s *brokerSource) ReplayPage(ctx context.Context, channels []string, after uint64, count int64) (registry.Page, error) {
	p, err := s.b.ReplayPage(ctx, channels, after, count)
	if err != nil {
		return registry.Page{}, err
	}
	msgs := make([]registry.Message, len(p.Messages))
	for i, m := range p.Messages {
		msgs[i] = registry.Message(m)
	}
	return registry.Page{Messages: msgs, Truncated: p.Truncated, More: p.More, Next: p.Next}, nil
}

// brokerSink hands what the broker reads to the registry.
type brokerSink struct{ reg *registry.Registry }

func (s brokerSink) HandleMessage(m broker.Message) { s.reg.Deliver(registry.Message(m)) }

func (s brokerSink) HandleDisconnect() { s.reg.Disconnected() }

// HandleChannelsDown and HandleChannelsUp hold and catch up the channels
// of one shard (sharded mode) while the others go on.
func (s brokerSink) HandleChannelsDown(channels []string) { s.reg.HoldChannels(channels) }

func (s brokerSink) HandleChannelsUp(channels []string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s.reg.ReleaseChannels(ctx, channels)
}

func (s brokerSink) HandleReconnect() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s.reg.Reconnected(ctx)
}

// go-redis logs each failed dial of its pools to stderr, several a second
// during an outage, whatever Caddy's log level. The broker reports the outage
// once; go-redis's own lines go to Caddy's log at debug.
var redisLogger sync.Once

type goRedisLogger struct{ l *zap.Logger }

func (g goRedisLogger) Printf(_ context.Context, format string, v ...any) {
	if ce := g.l.Check(zap.DebugLevel, "go-redis"); ce != nil {
		ce.Write(zap.String("message", fmt.Sprintf(format, v...)))
	}
}

// errShardedNeedsCluster refuses sharded without cluster.
var errShardedNeedsCluster = fmt.Errorf("redis: sharded needs cluster (sharded pub/sub exists on a Redis Cluster only: give its nodes in addrs, and cluster)")

// defaultRedisURL is used when neither the config nor REDIS_URL names one.
const defaultRedisURL = "redis://127.0.0.1:6379"

// options turns the config into go-redis options, expanding placeholders
// such as {env.REDIS_URL}.
func (c *RedisConfig) options() (*redis.UniversalOptions, bool, error) {
	repl := caddy.NewReplacer()
	if c == nil {
		c = &RedisConfig{}
	}
	if c.Sharded && !c.Cluster {
		return nil, false, errShardedNeedsCluster
	}
	if len(c.Addrs) > 0 {
		if c.URL != "" {
			return nil, false, fmt.Errorf("redis: give either a url or addrs, not both")
		}
		opts := &redis.UniversalOptions{
			Addrs:      c.Addrs,
			MasterName: c.MasterName,
			Username:   repl.ReplaceAll(c.Username, ""),
			Password:   repl.ReplaceAll(c.Password, ""),
			DB:         c.DB,
		}
		if c.TLS {
			opts.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12}
		}
		return opts, c.Cluster, nil
	}
	raw := c.URL
	if raw == "" {
		raw = "{env.REDIS_URL}"
	}
	u := strings.TrimSpace(repl.ReplaceAll(raw, ""))
	if u == "" {
		u = defaultRedisURL
	}
	opts, err := broker.ParseURL(u)
	if err != nil {
		return nil, false, fmt.Errorf("redis: %w", err)
	}
	if c.Username != "" {
		opts.Username = repl.ReplaceAll(c.Username, "")
	}
	if c.Password != "" {
		opts.Password = repl.ReplaceAll(c.Password, "")
	}
	if c.DB != 0 {
		opts.DB = c.DB
	}
	if c.TLS && opts.TLSConfig == nil {
		opts.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	return opts, c.Cluster, nil
}

// exiting is closed once Caddy is exiting, so that streams end promptly
// instead of holding up the server's graceful shutdown forever. Caddy runs
// its exit callbacks only after the servers stopped, too late for that, so
// the flag is polled.
var (
	exiting     = make(chan struct{})
	exitWatcher sync.Once
)

func watchExit() {
	exitWatcher.Do(func() {
		go func() {
			t := time.NewTicker(100 * time.Millisecond)
			defer t.Stop()
			for range t.C {
				if caddy.Exiting() {
					close(exiting)
					return
				}
			}
		}()
	})
}

// retention is the history a config asks Redis to keep.
func (hi *History) retention() broker.Retention {
	if hi == nil {
		return broker.Retention{}
	}
	return broker.Retention{MaxLen: int64(hi.Size), TTL: time.Duration(hi.TTL)}
}

package caddysse

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/caddy-sse/caddy-sse/broker"
	"github.com/caddy-sse/caddy-sse/registry"
)

// hub is a registry with the broker that feeds it.
type hub struct {
	reg    *registry.Registry
	brk    *broker.Broker
	logger *zap.Logger
	// stop ends the catch-ups the broker asks for (brokerSink), so that
	// the broker's Close, which waits for them, is not held up by Redis.
	stop context.CancelFunc

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
	key, err := hubKey(opts, cluster, sharded)
	if err != nil {
		return nil, "", err
	}
	v, _, err := proc().hubs.LoadOrNew(key, func() (caddy.Destructor, error) {
		return newHub(opts, cluster, sharded, logger)
	})
	if err != nil {
		return nil, "", err
	}
	return v.(*hub), key, nil
}

func releaseHub(key string) error {
	_, err := proc().hubs.Delete(key)
	return err
}

// newHub wires a registry and its broker, which need each other: the broker
// delivers to the registry, the registry subscribes through the broker.
// broker.New starts reading at once, so the registry it delivers to is built
// whole first, and started last, once its source holds the broker: until
// the registry has subscribed a channel, nothing the broker delivers
// reaches the source or OnClose.
func newHub(opts *redis.UniversalOptions, cluster, sharded bool, logger *zap.Logger) (*hub, error) {
	proc().redisLogger.Do(func() { redis.SetLogger(goRedisLogger{logger.Named("go-redis")}) })
	ctx, stop := context.WithCancel(context.Background())
	h := &hub{logger: logger, stop: stop}
	src := &brokerSource{sharded: sharded}
	reg := registry.New(registry.Options{
		Source: src,
		Logger: logger,
		Metrics: registry.Metrics{
			Dropped: proc().metrics.dropped,
			Faults:  proc().metrics.faults,
		},
		OnClose: h.markClosed,
	})
	brk, err := broker.New(broker.Options{
		Redis:    opts,
		Cluster:  cluster,
		Sharded:  sharded,
		Logger:   logger,
		Instance: proc().instance,
		Metrics: broker.Metrics{
			Connected:        proc().metrics.redisConnected,
			Reconnects:       proc().metrics.redisReconnects,
			Channels:         proc().metrics.channels,
			Received:         proc().metrics.received,
			Rejected:         proc().metrics.rejected,
			PresenceFailures: proc().metrics.presenceFailures,
			LifecycleDropped: proc().metrics.lifecycleDropped,
		},
	}, brokerSink{reg: reg, ctx: ctx})
	if err != nil {
		stop()
		return nil, fmt.Errorf("redis: %w", err) // reg was never started: nothing to close
	}
	src.b = brk
	h.reg, h.brk = reg, brk
	reg.Start()
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
	h.brk.Go(func(ctx context.Context) {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if err := h.brk.EnsureHistory(ctx, want); err != nil {
			h.logger.Warn("installing the history functions in Redis failed; will retry on reconnect",
				zap.Error(err))
		}
	})
}

// markClosed records in Redis that a publisher ended channel, so that
// reconnecting clients on any instance get 204. It runs on the delivering
// goroutine, so the Redis call goes to one of the broker's (Destruct waits
// for it).
func (h *hub) markClosed(channel string) {
	h.brk.Go(func(ctx context.Context) {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if err := h.brk.MarkClosed(ctx, channel); err != nil {
			h.logger.Warn("cannot mark channel closed", zap.String("channel", channel), zap.Error(err))
		}
	})
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
		proc().clock.Shutdown(exitJitter)
		proc().clock.Wait(exitJitter + 250*time.Millisecond)
	}
	h.stop()
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
type brokerSink struct {
	reg *registry.Registry
	ctx context.Context // ends when the hub does
}

func (s brokerSink) HandleMessage(m broker.Message) { s.reg.Deliver(registry.Message(m)) }

func (s brokerSink) HandleDisconnect() { s.reg.Disconnected() }

// HandleChannelsDown and HandleChannelsUp hold and catch up the channels
// of one shard (sharded mode) while the others go on.
func (s brokerSink) HandleChannelsDown(channels []string) { s.reg.HoldChannels(channels) }

func (s brokerSink) HandleChannelsUp(channels []string) {
	ctx, cancel := context.WithTimeout(s.ctx, 30*time.Second)
	defer cancel()
	s.reg.ReleaseChannels(ctx, channels)
}

func (s brokerSink) HandleReconnect() {
	ctx, cancel := context.WithTimeout(s.ctx, 30*time.Second)
	defer cancel()
	s.reg.Reconnected(ctx)
}

// goRedisLogger takes go-redis's own log lines: go-redis logs each failed
// dial of its pools to stderr, several a second during an outage, whatever
// Caddy's log level. The broker reports the outage once; go-redis's lines go
// to Caddy's log at debug.
type goRedisLogger struct{ l *zap.Logger }

func (g goRedisLogger) Printf(_ context.Context, format string, v ...any) {
	if ce := g.l.Check(zap.DebugLevel, "go-redis"); ce != nil {
		ce.Write(zap.String("message", fmt.Sprintf(format, v...)))
	}
}

package caddysse

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-sse/caddy-sse/registry"
	"github.com/caddy-sse/caddy-sse/stream"
)

// process is the module's state that outlives any one config: every config
// load of the process shares it, so that a `caddy reload` keeps the
// streams, their Redis subscriptions, their counts and the live view's
// history. It is one value, so that a test can start from a fresh one
// (with no config loaded and no stream open).
type process struct {
	// hubs shares one hub per Redis configuration (see hubKey).
	hubs *caddy.UsagePool
	// limits counts the streams of each max_connections_per key.
	limits *registry.Limits
	// instance names this process in Redis (presence fields, the liveness
	// key, lifecycle entries).
	instance string
	// metrics are the collectors, registered in each config's registry.
	metrics *collectors
	// live samples the counters for the admin live view.
	live *liveRecorder
	// liveRegistry holds the collectors for the live view to read them the
	// way /metrics does (they may be in many registries).
	liveRegistry func() *prometheus.Registry
	// redisLogger routes go-redis's own log lines to Caddy's, once.
	redisLogger sync.Once

	// streams counts the open streams, across config reloads, for
	// max_connections.
	streams atomic.Int64

	// clock drives the keepalives and deadlines of every stream; poller
	// notices taken-over clients closing (see package stream).
	clock  *stream.Clock
	poller func() *stream.Poller
}

// current is the process's state; tests swap it for a fresh one.
var current atomic.Pointer[process]

func init() { current.Store(newProcess()) }

// proc returns the process's state.
func proc() *process { return current.Load() }

func newProcess() *process {
	p := &process{
		hubs:     caddy.NewUsagePool(),
		limits:   registry.NewLimits(),
		instance: newInstanceID(),
		metrics:  newCollectors(),
		live:     new(liveRecorder),
		clock:    stream.NewClock(250 * time.Millisecond),
	}
	p.poller = sync.OnceValue(func() *stream.Poller {
		return stream.NewPoller(caddy.Log().Named("http.handlers.sse"))
	})
	p.liveRegistry = sync.OnceValue(func() *prometheus.Registry {
		reg := prometheus.NewRegistry()
		_ = p.metrics.register(reg) // new registry: nothing is registered twice
		return reg
	})
	return p
}

// stopping ends every stream promptly, with a little jitter, once Caddy
// exits, instead of holding up the servers' graceful shutdown forever
// (taken-over connections are not even waited for). Caddy emits "stopping"
// before it stops the servers, on exit and whenever a config is unloaded;
// a reload keeps the streams. (Exit callbacks run after the servers
// stopped: too late.)
type stopping struct{}

// watchStopping subscribes to the config's "stopping" event, through the
// events app (loaded if the config has none).
func watchStopping(ctx caddy.Context) error {
	app, err := ctx.App("events")
	if err != nil {
		return fmt.Errorf("events app: %w", err)
	}
	events, ok := app.(*caddyevents.App)
	if !ok {
		return fmt.Errorf("events app: unexpected type %T", app)
	}
	return events.On("stopping", stopping{})
}

func (stopping) Handle(context.Context, caddy.Event) error {
	if caddy.Exiting() {
		proc().clock.Shutdown(exitJitter)
	}
	return nil
}

var _ caddyevents.Handler = stopping{}

// newInstanceID names a process in Redis: the host name, so that an
// operator knows where to look, and a random suffix, so that two processes
// on one host (or a restart) never share fields.
func newInstanceID() string {
	host, _ := os.Hostname()
	host = strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '.', r == '_':
			return r
		}
		return -1
	}, host)
	if len(host) > 64 {
		host = host[:64]
	}
	if host == "" {
		host = "caddy"
	}
	var b [4]byte
	_, _ = rand.Read(b[:])
	return host + "-" + hex.EncodeToString(b[:])
}

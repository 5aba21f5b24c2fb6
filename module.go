// Package caddysse is a Caddy module that streams Redis pub/sub channels to
// browsers as Server-Sent Events.
//
// This file holds the `sse` handler's configuration and its life cycle in
// Caddy; handler.go serves the streams.
package caddysse

import (
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/caddy-sse/caddy-sse/sse"
	"github.com/caddy-sse/caddy-sse/stream"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Defaults for options left unset.
const (
	defaultKeepalive   = 15 * time.Second
	defaultBuffer      = 256
	defaultMaxChannels = 16
)

// Handler streams the Redis pub/sub channels named by its channel templates
// to the client as Server-Sent Events.
type Handler struct {
	// Redis to subscribe to. Defaults to {env.REDIS_URL}, then
	// redis://127.0.0.1:6379.
	Redis *RedisConfig `json:"redis,omitempty"`

	// Channels to subscribe the stream to. Each is a template in which Caddy
	// placeholders are expanded per request; a value with commas (for example
	// a header listing several channels) is split into several channels.
	Channels []string `json:"channels,omitempty"`

	// Allow is a regular expression every resolved channel must match in
	// full, else the request is refused with 403.
	Allow string `json:"allow,omitempty"`

	// Format says how a published payload becomes an event: "raw" (the
	// payload is the data, the default) or "envelope" (JSON with event, id,
	// data, retry and close fields).
	Format string `json:"format,omitempty"`

	// Keepalive is how long a stream may be silent before a comment line is
	// sent to keep proxies and clients from timing it out. Default: 15s.
	Keepalive caddy.Duration `json:"keepalive,omitempty"`

	// Retry is sent at stream start as the client's reconnection delay.
	Retry caddy.Duration `json:"retry,omitempty"`

	// Buffer is the number of events queued per stream; a stream that falls
	// this far behind is closed (it resumes on reconnect). Default: 256.
	Buffer int `json:"buffer,omitempty"`

	// History keeps recent events of each channel in Redis so that a client
	// reconnecting with Last-Event-ID gets what it missed.
	History *History `json:"history,omitempty"`

	// MaxConnections caps the open streams of this Caddy instance; past it
	// requests get 503 with Retry-After. 0: no cap.
	MaxConnections int `json:"max_connections,omitempty"`

	// MaxChannels caps the channels of one stream; past it requests get 400.
	// Default: 16.
	MaxChannels int `json:"max_channels,omitempty"`

	// LastEventID is a template for the resume point of a stream whose client
	// sent no Last-Event-ID. Behind reverse_proxy's handle_response, the app
	// can answer with a header such as X-Sse-Last-Event-Id: 0 and this set
	// to {rp.header.X-Sse-Last-Event-Id}, so that what it publishes before
	// the stream is attached is replayed from history, not lost. Needs
	// history.
	LastEventID string `json:"last_event_id,omitempty"`

	// Takeover, on unless set to false, takes an HTTP/1.x connection over
	// once its stream is admitted: the response head is written directly,
	// and the request's goroutine and buffers are released, so that an idle
	// stream costs little more than its socket. Such streams bypass
	// response-writing handlers that wrap the stream (encode). HTTP/2 and
	// HTTP/3 streams are always served the standard way.
	Takeover *bool `json:"takeover,omitempty"`

	// MaxDuration closes a stream after about this long (with up to 10%
	// jitter) so that load rebalances across instances; clients reconnect and
	// resume. 0: no limit.
	MaxDuration caddy.Duration `json:"max_duration,omitempty"`

	// JWT, when set, requires every stream request to carry a valid JSON Web
	// Token (else 401) whose claim grants each of its channels (else 403).
	// The token's subject is {http.sse.jwt.sub} (or {sse.jwt.sub}) in the
	// channel templates.
	JWT *JWTConfig `json:"jwt,omitempty"`

	// MaxConnectionsPer caps the concurrent streams of this process that
	// share a key, such as the authenticated user.
	MaxConnectionsPer *ConnectionLimit `json:"max_connections_per,omitempty"`

	// Presence counts the streams of each identity per channel in Redis,
	// across every instance, for backends to read with one command (FCALL
	// sse_presence). Off unless set.
	Presence *Presence `json:"presence,omitempty"`

	// Lifecycle appends an entry to a Redis stream when a stream opens and
	// when it ends (with the presence identity, if any). Off unless set.
	Lifecycle *Lifecycle `json:"lifecycle,omitempty"`

	allow        *regexp.Regexp
	listTemplate []bool // per channel template: a lone placeholder, whose value is a list
	format       sse.Format
	hub          *hub
	hubKey       string
	logger       *zap.Logger
	takeover     bool
	streams      *stream.Options
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.sse",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision compiles the options and takes a reference to the hub (the
// registry and its Redis broker) shared by every config using the same Redis.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if srv, ok := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); ok {
		registerConnContext(srv)
	}
	if err := h.compile(); err != nil {
		return err
	}
	if err := watchStopping(ctx); err != nil {
		return err
	}
	h.streams = &stream.Options{
		Keepalive: time.Duration(h.Keepalive),
		Evicted:   evictedFrame,
		Logger:    h.logger,
		Metrics:   streamMetrics{},
		Clock:     proc().clock,
		Poller:    proc().poller(),
	}
	if err := proc().metrics.register(ctx.GetMetricsRegistry()); err != nil {
		return err
	}
	hb, key, err := acquireHub(h.Redis)
	if err != nil {
		return err
	}
	h.hub, h.hubKey = hb, key
	if r := h.History.retention(); r.MaxLen > 0 {
		hb.wantHistory(r)
	}
	if h.Presence != nil {
		hb.brk.EnablePresence(time.Duration(h.Presence.TTL))
	}
	if h.Lifecycle != nil {
		hb.brk.EnableLifecycle()
	}
	return nil
}

// compile checks and converts the options that need it; every error names
// its option.
func (h *Handler) compile() error {
	if len(h.Channels) == 0 {
		return fmt.Errorf("channel: at least one channel template is required")
	}
	h.listTemplate = make([]bool, len(h.Channels))
	for i, c := range h.Channels {
		if strings.TrimSpace(c) == "" {
			return fmt.Errorf("channel: empty channel template")
		}
		if !strings.Contains(c, "{") {
			if _, err := checkNames([]string{c}); err != nil {
				return fmt.Errorf("channel: %q: %w", c, err)
			}
		}
		h.listTemplate[i] = isListTemplate(c)
	}
	if h.Allow != "" {
		re, err := regexp.Compile(`^(?:` + h.Allow + `)$`)
		if err != nil {
			return fmt.Errorf("allow: %w", err)
		}
		h.allow = re
	}
	f, err := sse.ParseFormat(h.Format)
	if err != nil {
		return fmt.Errorf("format: %w", err)
	}
	h.format = f
	h.takeover = h.Takeover == nil || *h.Takeover
	if h.Keepalive == 0 {
		h.Keepalive = caddy.Duration(defaultKeepalive)
	}
	if h.Buffer == 0 {
		h.Buffer = defaultBuffer
	}
	if h.MaxChannels == 0 {
		h.MaxChannels = defaultMaxChannels
	}
	if h.JWT != nil {
		if err := h.JWT.compile(); err != nil {
			return err
		}
	}
	if err := h.Presence.validate(); err != nil {
		return err
	}
	if err := h.Lifecycle.validate(); err != nil {
		return err
	}
	return h.MaxConnectionsPer.validate()
}

// Validate refuses values out of range; every error names its option.
func (h *Handler) Validate() error {
	switch {
	case h.Keepalive < 0:
		return fmt.Errorf("keepalive: must not be negative")
	case h.Retry < 0:
		return fmt.Errorf("retry: must not be negative")
	case h.Buffer < 0:
		return fmt.Errorf("buffer: must not be negative")
	case h.MaxConnections < 0:
		return fmt.Errorf("max_connections: must not be negative")
	case h.MaxChannels < 0:
		return fmt.Errorf("max_channels: must not be negative")
	case h.MaxDuration < 0:
		return fmt.Errorf("max_duration: must not be negative")
	}
	if err := h.MaxConnectionsPer.validate(); err != nil {
		return err
	}
	if err := h.Presence.validate(); err != nil {
		return err
	}
	if err := h.Lifecycle.validate(); err != nil {
		return err
	}
	if err := h.JWT.validate(); err != nil {
		return err
	}
	if err := h.Redis.validate(); err != nil {
		return err
	}
	return h.History.validate()
}

// Cleanup drops this config's reference to the hub; the hub and its open
// streams live on while a newer config uses the same Redis.
func (h *Handler) Cleanup() error {
	if h.hub == nil {
		return nil
	}
	return releaseHub(h.hubKey)
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)

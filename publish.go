package caddysse

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(Publish{})
}

// Publish is the `sse_publish` handler: it publishes each POST body to the
// channel named by its template, exactly as a Redis publisher would, for
// backends that cannot reach Redis. It is protected only by what the
// operator puts in front of it (matchers, basic_auth, forward_auth).
type Publish struct {
	// Redis to publish to; as in the sse handler.
	Redis *RedisConfig `json:"redis,omitempty"`
	// Channel is the template of the channel to publish to; placeholders are
	// expanded per request. A request that resolves to no channel gets 400.
	Channel string `json:"channel,omitempty"`
	// History makes each published event resumable, as in the sse handler.
	History *History `json:"history,omitempty"`
	// MaxSize is the largest body accepted, in bytes; larger gets 413.
	// Default: 1 MiB.
	MaxSize int64 `json:"max_size,omitempty"`

	hub    *hub
	hubKey string
	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (Publish) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.sse_publish",
		New: func() caddy.Module { return new(Publish) },
	}
}

// defaultMaxSize is the body limit when max_size is unset.
const defaultMaxSize = 1 << 20

// Provision takes a reference to the hub of its Redis.
func (p *Publish) Provision(ctx caddy.Context) error {
	p.logger = ctx.Logger()
	if err := proc().metrics.register(ctx.GetMetricsRegistry()); err != nil {
		return err
	}
	if p.MaxSize == 0 {
		p.MaxSize = defaultMaxSize
	}
	hb, key, err := acquireHub(p.Redis)
	if err != nil {
		return err
	}
	p.hub, p.hubKey = hb, key
	if r := p.History.retention(); r.MaxLen > 0 {
		hb.wantHistory(r)
	}
	return nil
}

// Validate refuses values out of range; every error names its option.
func (p *Publish) Validate() error {
	if strings.TrimSpace(p.Channel) == "" {
		return fmt.Errorf("channel: a channel template is required")
	}
	if !strings.Contains(p.Channel, "{") {
		if _, err := checkNames([]string{p.Channel}); err != nil {
			return fmt.Errorf("channel: %q: %w", p.Channel, err)
		}
	}
	if p.MaxSize < 0 {
		return fmt.Errorf("max_size: must not be negative")
	}
	if err := p.Redis.validate(); err != nil {
		return err
	}
	return p.History.validate()
}

// Cleanup drops this config's reference to the hub.
func (p *Publish) Cleanup() error {
	if p.hub == nil {
		return nil
	}
	return releaseHub(p.hubKey)
}

// ServeHTTP publishes the request body and answers with the event id.
func (p *Publish) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", "POST")
		return p.refuse(w, r, http.StatusMethodNotAllowed, "method", "method not allowed: use POST")
	}
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	// One channel per request, whatever the template: a value's comma
	// never makes a second one (see expandChannels).
	names, err := expandChannels(repl, p.Channel, false)
	if err != nil {
		ce := err.(*channelError)
		return p.refuse(w, r, ce.status, "channel", ce.reason)
	}
	channel := names[0]
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, p.MaxSize))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			return p.refuse(w, r, http.StatusRequestEntityTooLarge, "max_size",
				fmt.Sprintf("message larger than %d bytes", p.MaxSize))
		}
		return p.refuse(w, r, http.StatusBadRequest, "body", "could not read the body")
	}
	seq, err := p.hub.brk.Publish(r.Context(), channel, body, p.History.retention())
	if err != nil {
		p.logger.Error("publish failed", zap.String("channel", channel), zap.Error(err))
		return p.refuse(w, r, http.StatusServiceUnavailable, "redis", "publish failed: Redis unavailable")
	}
	proc().metrics.published.WithLabelValues("ok").Inc()
	w.Header().Set("Content-Type", "application/json")
	if seq == 0 {
		_, _ = w.Write([]byte("{}\n"))
		return nil
	}
	_, _ = w.Write([]byte(`{"id":"` + strconv.FormatUint(seq, 10) + "\"}\n"))
	return nil
}

// refuse refuses a publish with status and a short reason (see refusal),
// counted under label in caddy_sse_published_total.
func (p *Publish) refuse(w http.ResponseWriter, r *http.Request, status int, label, reason string) error {
	proc().metrics.published.WithLabelValues(label).Inc()
	return refusal(w, r, status, reason)
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Publish)(nil)
	_ caddy.Validator             = (*Publish)(nil)
	_ caddy.CleanerUpper          = (*Publish)(nil)
	_ caddyhttp.MiddlewareHandler = (*Publish)(nil)
)

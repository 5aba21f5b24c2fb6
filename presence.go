package caddysse

// This file holds the `presence` and `lifecycle` options of the sse
// handler: who is connected, counted in Redis across instances, and an
// entry in a Redis stream when a stream opens or ends. The Redis side is
// the broker's (broker/presence.go, broker/lifecycle.go); here a stream's
// identity is expanded and its open and end are reported, without ever
// waiting for Redis.

import (
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-sse/caddy-sse/broker"
)

// Presence counts the streams of each identity per channel in Redis, where
// a backend reads them with FCALL sse_presence.
type Presence struct {
	// Identity is a template expanded per request, such as
	// {http.auth.user.id} or {http.sse.jwt.sub}. A stream whose identity expands
	// empty (or names an unknown placeholder) is anonymous: not counted.
	Identity string `json:"identity,omitempty"`
	// TTL bounds how long a killed instance keeps counting: its liveness
	// key expires this long after its last refresh (every TTL/3). At least
	// 3s; default 30s. The shortest TTL of the configs that share a Redis
	// wins.
	TTL caddy.Duration `json:"ttl,omitempty"`
}

// Lifecycle appends an entry to a Redis stream when a stream opens and
// when it ends.
type Lifecycle struct {
	// Stream is the key of the Redis stream.
	Stream string `json:"stream,omitempty"`
	// MaxLen caps the stream at about this many entries (MAXLEN ~).
	// Default: 10000.
	MaxLen int `json:"max_len,omitempty"`
}

// defaultLifecycleMaxLen is Lifecycle.MaxLen when unset.
const defaultLifecycleMaxLen = 10000

// maxIdentity is the longest identity accepted, in bytes: it is stored in
// Redis once per channel of every stream.
const maxIdentity = 256

func (p *Presence) validate() error {
	if p == nil {
		return nil
	}
	switch ttl := time.Duration(p.TTL); {
	case strings.TrimSpace(p.Identity) == "":
		return errors.New("presence: identity template required")
	case ttl < 0:
		return errors.New("presence: ttl must not be negative")
	case ttl > 0 && ttl < broker.MinPresenceTTL:
		return fmt.Errorf("presence: ttl must be at least %s, got %s", broker.MinPresenceTTL, ttl)
	}
	return nil
}

func (l *Lifecycle) validate() error {
	if l == nil {
		return nil
	}
	switch {
	case strings.TrimSpace(l.Stream) == "":
		return errors.New("lifecycle: stream key required")
	case broker.ModuleKey(l.Stream):
		return fmt.Errorf("lifecycle: %q is a key of the module's own in Redis: choose another stream key", l.Stream)
	case l.MaxLen < 0:
		return errors.New("lifecycle: max_len must not be negative")
	}
	return nil
}

func (l *Lifecycle) maxLen() int64 {
	if l.MaxLen == 0 {
		return defaultLifecycleMaxLen
	}
	return int64(l.MaxLen)
}

// identity expands the presence template for a request. An empty value
// (or an unknown placeholder) is an anonymous stream; a value that is too
// long, not UTF-8 or holds a control character refuses the request, as a
// channel's would: it is data, and a client that can steer it (a header)
// must not store what it likes in Redis.
func (h *Handler) identity(repl *caddy.Replacer) (string, *channelError) {
	if h.Presence == nil || repl == nil {
		return "", nil
	}
	v, err := repl.ReplaceOrErr(h.Presence.Identity, true, true)
	if err != nil || strings.TrimSpace(v) == "" {
		return "", nil
	}
	if len(v) > maxIdentity || !utf8.ValidString(v) || strings.IndexFunc(v, unicode.IsControl) >= 0 {
		return "", badChannel("bad presence identity")
	}
	return v, nil
}

// streamLife is what a stream's end reports: nil without lifecycle.
type streamLife struct {
	h        *Handler
	channels string
	identity string
}

// opened reports a stream that just opened: presence counts it (the
// returned undo, for the stream's admission, uncounts it once) and the
// lifecycle stream gets its open entry. Neither waits for Redis.
func (h *Handler) opened(channels []string, identity string) (*streamLife, func()) {
	var undo func()
	if h.Presence != nil && identity != "" {
		brk := h.hub.brk
		brk.PresenceAdd(channels, identity, 1)
		undo = func() { brk.PresenceAdd(channels, identity, -1) }
	}
	if h.Lifecycle == nil {
		return nil, undo
	}
	life := &streamLife{h: h, channels: strings.Join(channels, ","), identity: identity}
	life.emit("open", "")
	return life, undo
}

// closed reports the end of a stream, with the same reason as
// caddy_sse_streams_closed_total. Its callers run it once per stream.
func (l *streamLife) closed(why string) {
	if l != nil {
		l.emit("close", why)
	}
}

func (l *streamLife) emit(typ, reason string) {
	lc := l.h.Lifecycle
	l.h.hub.brk.Lifecycle(broker.LifecycleEvent{
		Stream: lc.Stream, MaxLen: lc.maxLen(), Type: typ,
		Channels: l.channels, Identity: l.identity, Reason: reason, Time: time.Now(),
	})
}

package caddysse

// This file configures max_connections_per: at most n concurrent streams
// per key (a user, a client address) in this process, counted by
// registry.Limits.

import (
	"errors"
	"fmt"
	"strings"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-sse/caddy-sse/registry"
	"github.com/caddy-sse/caddy-sse/sse"
)

// ConnectionLimit caps the concurrent streams that share a key.
type ConnectionLimit struct {
	// Key is a template expanded per request, such as {http.auth.user.id}
	// or {http.request.remote.host}. A request whose key expands empty (or
	// names an unknown placeholder) is not limited.
	Key string `json:"key,omitempty"`

	// Max is how many streams of one key may be open at once, at least 1.
	Max int `json:"max,omitempty"`

	// Policy says what happens to a stream past Max: "reject" (the default)
	// answers 429 with Retry-After; "evict_oldest" admits it and ends the
	// oldest stream of the key, as a new tab replacing the oldest one.
	Policy string `json:"policy,omitempty"`
}

// Policies of ConnectionLimit.
const (
	policyReject      = "reject"
	policyEvictOldest = "evict_oldest"
)

// EvictedEvent is the event a stream gets when a newer stream of the same
// max_connections_per key replaced it. A page should close its EventSource
// on it: reconnecting would evict the next oldest stream in turn.
const EvictedEvent = "sse-evicted"

// evictedFrame is written to an evicted stream before it ends. It carries
// no id, so that the client's Last-Event-ID stays put.
var evictedFrame = func() []byte {
	b, _ := sse.AppendEvent(nil, &sse.Event{Event: EvictedEvent, Data: []byte(`{"reason":"max_connections_per"}`)})
	return b
}()

func (l *ConnectionLimit) validate() error {
	if l == nil {
		return nil
	}
	switch {
	case strings.TrimSpace(l.Key) == "":
		return errors.New("max_connections_per: key template required")
	case l.Max < 1:
		return fmt.Errorf("max_connections_per: max must be at least 1, got %d", l.Max)
	case l.Policy != "" && l.Policy != policyReject && l.Policy != policyEvictOldest:
		return fmt.Errorf("max_connections_per: policy: want reject or evict_oldest, got '%s'", l.Policy)
	}
	return nil
}

// admitPer applies max_connections_per: it returns a release function to
// call when the stream ends, and false when the stream must be refused.
// Keys are prefixed with their template, so that handlers with the same
// template count together and others apart.
func (h *Handler) admitPer(repl *caddy.Replacer, sub *registry.Subscriber) (release func(), ok bool) {
	l := h.MaxConnectionsPer
	if l == nil || l.Max < 1 || repl == nil {
		return func() {}, true
	}
	v, err := repl.ReplaceOrErr(l.Key, true, true)
	if err != nil || v == "" {
		return func() {}, true
	}
	return proc().limits.Admit(l.Key+"\x00"+v, l.Max, l.Policy == policyEvictOldest, sub)
}

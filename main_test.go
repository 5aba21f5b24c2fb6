package caddysse

import (
	"testing"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
)

// TestMain removes the Caddy binary the process tests built.
func TestMain(m *testing.M) { caddyproc.Main(m) }

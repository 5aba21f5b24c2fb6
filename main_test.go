package caddysse

import (
	"os"
	"testing"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
)

// TestMain removes the Caddy binary the process tests built.
func TestMain(m *testing.M) {
	code := m.Run()
	caddyproc.RemoveBuilt()
	os.Exit(code)
}

package caddysse

import (
	"encoding/json"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

// runCaddy loads caddyfile ({PORT} and {REDIS} replaced) into this process,
// as `caddy run` would, and stops it at the end of the test. The test gets
// a fresh process state, so the hubs and counts it sees are its own.
func runCaddy(t *testing.T, caddyfile string, rs *redistest.Server) string {
	t.Helper()
	freshProcess(t)
	// A port free a moment ago may be taken before Caddy binds it: try
	// again with another.
	for attempt := 1; ; attempt++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		l.Close()
		cf := strings.NewReplacer("{PORT}", addr[strings.LastIndex(addr, ":")+1:], "{REDIS}", rs.URL(),
			"{STORAGE}", filepath.ToSlash(t.TempDir())).Replace(caddyfile)
		out, err := adaptCaddyfile(t, cf)
		if err != nil {
			t.Fatalf("adapting:\n%s\n%v", cf, err)
		}
		var cfg caddy.Config
		if err := json.Unmarshal(out, &cfg); err != nil {
			t.Fatal(err)
		}
		err = caddy.Run(&cfg)
		if err != nil && strings.Contains(err.Error(), "address already in use") && attempt < 5 {
			continue
		}
		if err != nil {
			t.Fatalf("loading:\n%s\n%v", cf, err)
		}
		t.Cleanup(func() {
			if err := caddy.Stop(); err != nil {
				t.Errorf("stopping Caddy: %v", err)
			}
		})
		return "http://" + addr
	}
}

const errorsGlobals = `{
	admin off
	default_bind 127.0.0.1
	persist_config off
	storage file_system {STORAGE}
	log {
		output discard
	}
}
`

// A refusal is a Caddy handler error: a handle_errors block answers it
// with its own body, the refusal's headers kept. Errors the block does not
// match get Caddy's own empty answer, as any handler's do.
func TestHandleErrorsAnswersRefusals(t *testing.T) {
	rs := redistest.Start(t)
	base := runCaddy(t, errorsGlobals+`
http://127.0.0.1:{PORT} {
	sse /events room:{query.room} {
		redis {REDIS}
		allow "room:[a-z]+"
	}
	handle_errors 403 405 {
		header X-Error-Route yes
		respond "not for you ({http.error.status_code}): {http.error.message}" {http.error.status_code}
	}
}
`, rs)

	code, hdr, body := ssetest.Do(t, http.MethodGet, base+"/events?room=Lobby!", "")
	if code != http.StatusForbidden || body != "not for you (403): channel not allowed" || hdr.Get("X-Error-Route") != "yes" {
		t.Errorf("403: %d %q (X-Error-Route %q), want handle_errors' answer", code, body, hdr.Get("X-Error-Route"))
	}
	code, hdr, body = ssetest.Do(t, http.MethodDelete, base+"/events?room=lobby", "")
	if code != http.StatusMethodNotAllowed || !strings.HasPrefix(body, "not for you (405)") || hdr.Get("Allow") != "GET, POST" {
		t.Errorf("405: %d %q (Allow %q), want handle_errors' answer with the refusal's Allow", code, body, hdr.Get("Allow"))
	}
	code, _, body = ssetest.Do(t, http.MethodGet, base+"/events?room=", "")
	if code != http.StatusBadRequest || body != "" {
		t.Errorf("400 that handle_errors does not match: %d %q, want Caddy's empty 400", code, body)
	}
	// The stream itself is untouched.
	s := ssetest.Open(t, base+"/events?room=lobby")
	ssetest.WaitNumsub(t, rs.Client(), "room:lobby", 1, ssetest.Timeout)
	ssetest.Publish(t, rs.Client(), "room:lobby", "hello")
	ssetest.Expect(t, s, "hello")
	s.Close()
	// Refusals are still counted, in this test's own collectors.
	if n := testutil.ToFloat64(proc().metrics.streamsRejected.WithLabelValues("channels")); n != 2 {
		t.Errorf("caddy_sse_streams_rejected_total{reason=\"channels\"} = %v, want 2", n)
	}
}

// Without handle_errors Caddy would answer an error with an empty body: a
// refusal then carries its short plain-text reason and its headers.
func TestRefusalsWithoutHandleErrors(t *testing.T) {
	rs := redistest.Start(t)
	base := runCaddy(t, errorsGlobals+`
http://127.0.0.1:{PORT} {
	sse /events room:{query.room} {
		redis {REDIS}
		allow "room:[a-z]+"
		max_connections 1
	}
}
`, rs)
	for _, tt := range []struct {
		method, path string
		status       int
		body, header string
	}{
		{http.MethodGet, "/events?room=Lobby!", http.StatusForbidden, "channel not allowed\n", ""},
		{http.MethodGet, "/events?room=", http.StatusBadRequest, "no channel: a placeholder in the channel template is empty\n", ""},
		{http.MethodPut, "/events?room=lobby", http.StatusMethodNotAllowed, "method not allowed: use GET or POST\n", "Allow"},
	} {
		code, hdr, body := ssetest.Do(t, tt.method, base+tt.path, "")
		if code != tt.status || body != tt.body || !strings.HasPrefix(hdr.Get("Content-Type"), "text/plain") ||
			tt.header != "" && hdr.Get(tt.header) == "" {
			t.Errorf("%s %s: %d %q %v, want %d %q with %s", tt.method, tt.path, code, body, hdr, tt.status, tt.body, tt.header)
		}
	}
	_ = ssetest.Open(t, base+"/events?room=lobby")
	code, hdr, body := ssetest.Do(t, http.MethodGet, base+"/events?room=lobby", "")
	if code != http.StatusServiceUnavailable || body != "too many streams; retry later\n" || hdr.Get("Retry-After") == "" {
		t.Errorf("past max_connections: %d %q (Retry-After %q), want 503 with Retry-After", code, body, hdr.Get("Retry-After"))
	}
}

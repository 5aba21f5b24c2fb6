package forwardauth

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-sse/caddy-sse/examples/internal/exampletest"
	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

// app stands for the existing app: its sessions are bearer tokens, and it
// answers the auth subrequest with the user's channels.
type app struct {
	mu       sync.Mutex
	authSeen []http.Header // the headers of each auth subrequest
}

var sessions = map[string]string{
	"alice-token":   "user:1,team:7",
	"bob-token":     "user:2",
	"carol-token":   "",           // logged in, but no channels: no header
	"mallory-token": "admin:root", // an app bug: a channel allow refuses
}

func (a *app) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/auth/sse":
		a.mu.Lock()
		a.authSeen = append(a.authSeen, r.Header.Clone())
		a.mu.Unlock()
		channels, ok := sessions[strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")]
		if !ok {
			w.Header().Set("WWW-Authenticate", "Bearer")
			http.Error(w, "login required", http.StatusUnauthorized)
			return
		}
		if channels != "" {
			w.Header().Set("X-Sse-Channels", channels)
		}
		w.WriteHeader(http.StatusNoContent)
	case "/events":
		http.Error(w, "the stream must not reach the app", http.StatusTeapot)
	default:
		io.WriteString(w, "app page "+r.URL.Path)
	}
}

func TestForwardAuthExample(t *testing.T) {
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	a := &app{}
	srv := httptest.NewServer(a)
	t.Cleanup(srv.Close)
	addr := srv.Listener.Addr().String()
	cf := exampletest.Caddyfile(t, "Caddyfile",
		"http://localhost:8000", "http://127.0.0.1:{HTTP}",
		"redis://127.0.0.1:6379", rs.URL(),
		"forward_auth /events 127.0.0.1:8080", "forward_auth /events "+addr,
		"reverse_proxy 127.0.0.1:8080", "reverse_proxy "+addr,
	)
	in := caddyproc.Start(t, cf, nil)
	rdb := rs.Client()
	ctx := context.Background()

	open := func(header ...string) (*sseclient.Stream, *sseclient.StatusError) {
		t.Helper()
		s, err := sseclient.Get(ctx, in.URL()+"/events", header...)
		var se *sseclient.StatusError
		if errors.As(err, &se) {
			return nil, se
		}
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(s.Close)
		return s, nil
	}
	refused := func(wantCode int, wantBody string, header ...string) {
		t.Helper()
		s, se := open(header...)
		if s != nil {
			s.Close()
			t.Fatalf("%q: stream opened, want %d", header, wantCode)
		}
		if se.Code != wantCode || !strings.Contains(se.Body, wantBody) {
			t.Fatalf("%q: %d %q, want %d %q", header, se.Code, se.Body, wantCode, wantBody)
		}
	}

	// Not logged in: the app's 401 goes back as is.
	refused(http.StatusUnauthorized, "login required")
	refused(http.StatusUnauthorized, "login required", "Authorization", "Bearer nobody")
	// A forged header without a session gets nothing either.
	refused(http.StatusUnauthorized, "login required", "X-Sse-Channels", "user:2")
	// Logged in, no channels: a forged header is removed, not used.
	refused(http.StatusBadRequest, "no channel", "Authorization", "Bearer carol-token", "X-Sse-Channels", "user:2")
	// The app hands out a channel allow refuses.
	refused(http.StatusForbidden, "not allowed", "Authorization", "Bearer mallory-token")
	if chans, err := rdb.PubSubChannels(ctx, "*").Result(); err != nil || len(chans) != 0 {
		t.Fatalf("after refusals, subscribed channels: %v %v", chans, err)
	}

	// Alice gets her channels, and a forged header adds nothing.
	alice, _ := open("Authorization", "Bearer alice-token", "X-Sse-Channels", "user:2")
	bob, _ := open("Authorization", "Bearer bob-token")
	a.mu.Lock()
	last := a.authSeen[len(a.authSeen)-2] // alice's subrequest
	a.mu.Unlock()
	if got := last.Get("Authorization"); got != "Bearer alice-token" {
		t.Fatalf("the auth subrequest carried Authorization %q", got)
	}

	ssetest.Publish(t, rdb, "user:2", "for bob")
	ssetest.Publish(t, rdb, "team:7", "for alice's team")
	ssetest.Publish(t, rdb, "user:1", "for alice")
	ssetest.Expect(t, bob, "for bob")
	ssetest.Expect(t, alice, "for alice's team", "for alice")
	ssetest.NoEvent(t, alice, 200*time.Millisecond)
	ssetest.NoEvent(t, bob, 10*time.Millisecond)

	// Everything else is the app's.
	resp, err := http.Get(in.URL() + "/dashboard")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "app page /dashboard" {
		t.Fatalf("GET /dashboard = %d %q", resp.StatusCode, body)
	}
}

// The README's stand-in for the app (./caddy respond, answering every
// request with 204 and X-Sse-Channels) in front of the shipped Caddyfile:
// GET /events opens a stream on both channels it names, as the README says.
func TestReadmeStandInApp(t *testing.T) {
	var standIn string
	for _, c := range exampletest.ReadmeCommands(t, "README.md") {
		if strings.HasPrefix(c, "./caddy respond ") {
			standIn = c
		}
	}
	if standIn == "" {
		t.Fatal("the README no longer gives a stand-in app")
	}
	addr := exampletest.StandIn(t, standIn)
	rs := redistest.Start(t)
	cf := exampletest.Caddyfile(t, "Caddyfile",
		"http://localhost:8000", "http://127.0.0.1:{HTTP}",
		"redis://127.0.0.1:6379", rs.URL(),
		"forward_auth /events 127.0.0.1:8080", "forward_auth /events "+addr,
		"reverse_proxy 127.0.0.1:8080", "reverse_proxy "+addr,
	)
	in := caddyproc.Start(t, cf, nil)
	s := ssetest.Open(t, in.URL()+"/events")
	for _, channel := range []string{"team:7", "user:42"} {
		if n := ssetest.Publish(t, rs.Client(), channel, "hello "+channel); n != 1 {
			t.Fatalf("PUBLISH %s reached %d subscriptions, want 1", channel, n)
		}
		if ev := ssetest.Next(t, s); ev.Data != "hello "+channel {
			t.Fatalf("got %+v, want %q", ev, "hello "+channel)
		}
	}
}

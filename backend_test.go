package caddysse_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

// The existing app decides: it authenticates the request and answers with
// the channel instead of a body; Caddy holds the stream.
var backendCaddyfile = globalOptions + `
http://127.0.0.1:{HTTP} {
	reverse_proxy {APP} {
		@stream header X-Sse-Channel *
		handle_response @stream {
			sse {
				redis {REDIS}
				channel {rp.header.X-Sse-Channel}
				allow chat:[0-9]+
				format envelope
				history 1000 10m
				last_event_id {rp.header.X-Sse-Last-Event-Id}
			}
		}
	}
}
`

// chatApp is a legacy app: POST /chat with the right token starts an answer
// on a fresh channel and publishes it in chunks to Redis.
type chatApp struct {
	rdb    *redis.Client
	nextID atomic.Int64
	answer []string
}

func (a *chatApp) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == "/chat" && r.Method == http.MethodPost:
		if r.Header.Get("Authorization") != "Bearer good" {
			http.Error(w, "who are you?", http.StatusUnauthorized)
			return
		}
		body, _ := io.ReadAll(r.Body)
		if !strings.Contains(string(body), "question") {
			http.Error(w, "no question", http.StatusBadRequest)
			return
		}
		channel := fmt.Sprintf("chat:%d", a.nextID.Add(1))
		w.Header().Set("X-Sse-Channel", channel)
		// Stream from the start of the channel's history: chunks published
		// before Caddy attached the stream are not lost.
		w.Header().Set("X-Sse-Last-Event-Id", "0")
		w.WriteHeader(http.StatusOK)
		go a.publish(channel)
	case strings.HasPrefix(r.URL.Path, "/chat/") && r.Method == http.MethodGet:
		// EventSource reconnects here to follow an answer already started.
		w.Header().Set("X-Sse-Channel", "chat:"+strings.TrimPrefix(r.URL.Path, "/chat/"))
		w.WriteHeader(http.StatusOK)
	case r.URL.Path == "/evil":
		// An app bug naming a channel outside the allowed pattern.
		w.Header().Set("X-Sse-Channel", "user:1,chat:1")
		w.WriteHeader(http.StatusOK)
	default:
		_, _ = io.WriteString(w, "plain page")
	}
}

func (a *chatApp) publish(channel string) {
	ctx := context.Background()
	for _, chunk := range a.answer {
		payload := fmt.Sprintf(`{"event":"chunk","data":%q}`, chunk)
		a.rdb.FCall(ctx, "sse_publish", []string{channel}, payload)
		time.Sleep(5 * time.Millisecond)
	}
	a.rdb.FCall(ctx, "sse_publish", []string{channel}, `{"event":"done","data":"","close":true}`)
}

func startBackend(t *testing.T) (*caddyproc.Instance, *chatApp) {
	t.Helper()
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	app := &chatApp{rdb: rs.Client(), answer: []string{"He", "llo", ", ", "wor", "ld", "!"}}
	upstream := httptest.NewServer(app)
	t.Cleanup(upstream.Close)
	in := caddyproc.Start(t, backendCaddyfile, caddyproc.Options{
		"{REDIS}": rs.URL(),
		"{APP}":   strings.TrimPrefix(upstream.URL, "http://"),
	})
	waitFunctions(t, rs.Client())
	return in, app
}

func chatRequest(t *testing.T, in *caddyproc.Instance, token string, header ...string) *http.Request {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, in.URL()+"/chat", strings.NewReader(`{"question":"hi?"}`))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+token)
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	return req
}

func TestBackendDrivenStream(t *testing.T) {
	in, app := startBackend(t)
	s, err := sseclient.Open(context.Background(), nil, chatRequest(t, in, "good"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if ct := s.Resp.Header.Get("Content-Type"); ct != "text/event-stream; charset=utf-8" {
		t.Fatalf("Content-Type %q", ct)
	}
	var text strings.Builder
	for {
		ev := ssetest.Next(t, s)
		if ev.Event == "done" {
			break
		}
		if ev.Event != "chunk" {
			t.Fatalf("unexpected event %+v", ev)
		}
		text.WriteString(ev.Data)
	}
	if got, want := text.String(), strings.Join(app.answer, ""); got != want {
		t.Fatalf("typed %q, want %q", got, want)
	}
	// The close envelope ends the stream cleanly.
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the stream did not end after the close event")
	}
	if err := s.Err(); err != io.EOF {
		t.Fatalf("stream ended with %v, want a clean end", err)
	}
	// A client reconnecting to the finished channel is told to stop with
	// 204, so that EventSource does not reconnect in a loop.
	resp := rawGet(t, in.URL()+"/chat/1", http.Header{"Last-Event-Id": {s.LastEventID()}})
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("reconnect to a closed channel: %d, want 204", resp.StatusCode)
	}
}

func rawGet(t *testing.T, url string, header http.Header) *http.Response {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func TestBackendRefusalPassesThrough(t *testing.T) {
	in, _ := startBackend(t)
	resp, err := http.DefaultClient.Do(chatRequest(t, in, "bad"))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(string(body), "who are you?") {
		t.Fatalf("refused chat: %d %q, want the app's own 401", resp.StatusCode, body)
	}
	// Other responses of the app pass through untouched.
	resp = rawGet(t, in.URL()+"/page", nil)
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(body) != "plain page" {
		t.Fatalf("page: %d %q", resp.StatusCode, body)
	}
	// A channel the app names outside `allow` is refused, nothing subscribed.
	resp = rawGet(t, in.URL()+"/evil", nil)
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("channel outside allow: %d, want 403", resp.StatusCode)
	}
}

// Two users' chats are on different channels: neither sees the other's.
func TestBackendChatsAreIsolated(t *testing.T) {
	in, app := startBackend(t)
	s1, err := sseclient.Open(context.Background(), nil, chatRequest(t, in, "good"))
	if err != nil {
		t.Fatal(err)
	}
	defer s1.Close()
	s2, err := sseclient.Open(context.Background(), nil, chatRequest(t, in, "good"))
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	for _, s := range []*sseclient.Stream{s1, s2} {
		n := 0
		for {
			ev := ssetest.Next(t, s)
			if ev.Event == "done" {
				break
			}
			n++
		}
		if n != len(app.answer) {
			t.Fatalf("a chat stream got %d chunks, want exactly its own %d", n, len(app.answer))
		}
	}
}

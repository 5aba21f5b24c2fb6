package clients

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
)

// retryMS is the reconnection delay the resumable routes send. Both npm
// clients default to more (eventsource 3000ms, fetch-event-source 1000ms),
// so a reconnect sooner than maxGap proves they honoured it.
const (
	retryMS = 300
	maxGap  = 900 * time.Millisecond
)

// clientsCaddyfile has a route per kind of client test:
//   - /live/<room>: envelopes without history: event types, custom ids,
//     close (then 204 on reconnect);
//   - /resume/<room>: resumable events, and the server closes every stream
//     after about a second (max_duration), so clients reconnect with
//     Last-Event-ID again and again;
//   - POST /chat: fetch-event-source's case, a backend-driven stream: the
//     app checks the token and the JSON body, and answers with the channel.
const clientsCaddyfile = caddyproc.GlobalOptions + `
http://127.0.0.1:{HTTP} {
	sse /live/* {
		redis {REDIS}
		channel live:{path.1}
		format envelope
		retry 2s
		keepalive 200ms
	}
	sse /resume/* {
		redis {REDIS}
		channel resume:{path.1}
		format envelope
		history 1000 10m
		retry {RETRY}ms
		keepalive 200ms
		max_duration 1s
	}
	reverse_proxy /chat {APP} {
		@stream header X-Sse-Channel *
		handle_response @stream {
			sse {
				redis {REDIS}
				channel {rp.header.X-Sse-Channel}
				allow "chat:[a-z0-9-]+"
				format envelope
				history 1000 10m
				last_event_id {rp.header.X-Sse-Last-Event-Id}
				retry {RETRY}ms
				keepalive 200ms
				max_duration 1s
			}
		}
	}
}
`

// chatRequest is what the app saw of one POST /chat.
type chatRequest struct {
	Authorization, ContentType, LastEventID, Body string
}

// chatApp is the existing app behind fetch-event-source's stream: it checks
// the bearer token and the JSON body, then answers with the channel.
type chatApp struct {
	mu   sync.Mutex
	seen []chatRequest
}

func (a *chatApp) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	a.mu.Lock()
	a.seen = append(a.seen, chatRequest{
		Authorization: r.Header.Get("Authorization"),
		ContentType:   r.Header.Get("Content-Type"),
		LastEventID:   r.Header.Get("Last-Event-ID"),
		Body:          string(body),
	})
	a.mu.Unlock()
	if r.Method != http.MethodPost {
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	if r.Header.Get("Authorization") != "Bearer good-token" {
		http.Error(w, "bad token", http.StatusUnauthorized)
		return
	}
	var q struct{ Room string }
	if err := json.Unmarshal(body, &q); err != nil || !regexp.MustCompile(`^[a-z0-9-]+$`).MatchString(q.Room) {
		http.Error(w, "bad body", http.StatusBadRequest)
		return
	}
	w.Header().Set("X-Sse-Channel", "chat:"+q.Room)
	w.Header().Set("X-Sse-Last-Event-Id", "0")
	w.WriteHeader(http.StatusOK)
}

func (a *chatApp) requests() []chatRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]chatRequest(nil), a.seen...)
}

type server struct {
	redis *redistest.Server
	rdb   *redis.Client
	caddy *caddyproc.Instance
	app   *chatApp
}

func start(t *testing.T) *server {
	t.Helper()
	rs := redistest.Start(t)
	app := &chatApp{}
	srv := httptest.NewServer(app)
	t.Cleanup(srv.Close)
	in := caddyproc.Start(t, clientsCaddyfile, caddyproc.Options{
		"{REDIS}": rs.URL(),
		"{APP}":   srv.Listener.Addr().String(),
		"{RETRY}": strconv.Itoa(retryMS),
	})
	redistest.WaitLibrary(t, rs.Client(), "caddy_sse")
	return &server{redis: rs, rdb: rs.Client(), caddy: in, app: app}
}

func (s *server) publish(t *testing.T, channel, payload string) {
	t.Helper()
	if n, err := s.rdb.Publish(context.Background(), channel, payload).Result(); err != nil || n != 1 {
		t.Fatalf("PUBLISH %s: %d subscriptions, %v", channel, n, err)
	}
}

// checkResume checks a client's log across reconnects: it received the
// ticks 1..len(ids) in order, once each, with the published ids; it
// reconnected at least twice after the server ended the stream, each time
// sending the id of the last event it had, after about the server's retry
// delay. ended is the kind of line a client prints when the stream ends.
func checkResume(t *testing.T, log []msg, ids []string, ended string) {
	t.Helper()
	var ticks []msg
	lastID := ""
	connects := 0
	var endedAt int64
	for _, m := range log {
		switch m.Kind {
		case "event":
			if m.Data == "" && m.Type == "" {
				t.Errorf("an empty message: %+v (a comment or keepalive dispatched as an event?)", m)
			}
			if m.Type != "tick" {
				t.Errorf("an event of type %q, want tick: %+v", m.Type, m)
				continue
			}
			ticks = append(ticks, m)
			lastID = m.ID
			if m.LastEventID != nil {
				lastID = *m.LastEventID
			}
		case "connect":
			connects++
			if connects > 1 {
				if got := m.lastID(); got != lastID || got == "" {
					t.Errorf("reconnect %d sent Last-Event-ID %q, want %q (the last event's id)", connects, got, lastID)
				}
				if endedAt != 0 {
					gap := time.Duration(m.T-endedAt) * time.Millisecond
					if gap < retryMS*time.Millisecond*8/10 || gap >= maxGap {
						t.Errorf("reconnect %d came %v after the stream ended; the server's retry is %dms", connects, gap, retryMS)
					}
				}
			}
			endedAt = 0
		case ended:
			if endedAt == 0 {
				endedAt = m.T
			}
		}
	}
	if connects < 3 {
		t.Errorf("%d connections, want at least 3: the server closes every stream after about 1s", connects)
	}
	if len(ticks) != len(ids) {
		t.Errorf("received %d ticks, published %d", len(ticks), len(ids))
	}
	for i, m := range ticks {
		if i >= len(ids) {
			break
		}
		want := strconv.Itoa(i + 1)
		id := m.ID
		if m.LastEventID != nil {
			id = *m.LastEventID
		}
		if m.Data != want || id != ids[i] {
			t.Fatalf("tick %d is %q with id %s, want %s with id %s (a gap or a duplicate)", i, m.Data, id, want, ids[i])
		}
	}
}

// The npm package eventsource: event types, data, ids, comments never
// dispatched, close then 204; and gapless resume across server closes.
func TestEventSourcePackage(t *testing.T) {
	caddyproc.SkipShort(t)
	s := start(t)

	t.Run("events", func(t *testing.T) {
		es := startNode(t, "eventsource.mjs", s.caddy.URL()+"/live/room1", "chat", "notice")
		if c := es.next(10 * time.Second); c.Kind != "connect" || c.LastEventID != nil {
			t.Fatalf("first line %+v, want a connect without Last-Event-ID", c)
		}
		es.until("open", 10*time.Second)

		type want struct{ typ, data, id string }
		cases := []struct {
			payload string
			want    want
		}{
			{`{"event":"chat","id":"m-1","data":{"text":"hi"}}`, want{"chat", `{"text":"hi"}`, "m-1"}},
			{`{"data":"two\nlines"}`, want{"message", "two\nlines", "m-1"}},
			{`{"event":"notice","id":"m-2","data":"  two leading spaces"}`, want{"notice", "  two leading spaces", "m-2"}},
			{`not json`, want{"message", "not json", "m-2"}},
			{`{"event":"chat","data":"héllo ✓ \r\n crlf"}`, want{"chat", "héllo ✓ \n crlf", "m-2"}},
			{`{"event":"chat","id":"x\ny","data":"no injection"}`, want{"chat", "no injection", "x\uFFFDy"}},
		}
		for _, c := range cases {
			s.publish(t, "live:room1", c.payload)
			m := es.next(5 * time.Second)
			got := want{m.Type, m.Data, m.lastID()}
			if m.Kind != "event" || got != c.want {
				t.Fatalf("published %s: got %+v, want %+v", c.payload, m, c.want)
			}
		}
		// Keepalive comments every 200ms: none becomes an event.
		select {
		case m := <-es.lines:
			t.Fatalf("during silence: %+v", m)
		case <-time.After(700 * time.Millisecond):
		}

		// The publisher ends the channel: the event arrives, the stream
		// ends, the client reconnects (with its last id) after the retry
		// of 2s, gets 204 and stops.
		s.publish(t, "live:room1", `{"event":"notice","data":"bye","close":true}`)
		if m := es.next(5 * time.Second); m.Kind != "event" || m.Type != "notice" || m.Data != "bye" {
			t.Fatalf("got %+v, want the closing notice", m)
		}
		if m := es.next(5 * time.Second); m.Kind != "error" || m.ReadyState != 0 {
			t.Fatalf("got %+v, want an error while reconnecting (readyState 0)", m)
		}
		c := es.next(5 * time.Second)
		if c.Kind != "connect" || c.lastID() != "x\uFFFDy" {
			t.Fatalf("got %+v, want a reconnect with the last id", c)
		}
		m := es.next(5 * time.Second)
		if m.Kind != "error" || m.Code == nil || *m.Code != 204 || m.ReadyState != 2 {
			t.Fatalf("got %+v, want the 204 that closes the EventSource (readyState 2)", m)
		}
		select {
		case m := <-es.lines:
			t.Fatalf("after 204 the client went on: %+v", m)
		case <-time.After(2500 * time.Millisecond):
		}
	})

	t.Run("resume", func(t *testing.T) {
		es := startNode(t, "eventsource.mjs", s.caddy.URL()+"/resume/room2", "tick")
		log := es.until("open", 10*time.Second)
		ids := collectIDs(t, publishTicks(s.rdb, "resume:room2", 60, 50*time.Millisecond))
		for !hasTick(log, len(ids)) {
			log = append(log, es.next(10*time.Second))
		}
		checkResume(t, log, ids, "error")
		if t.Failed() {
			logLines(t, log)
		}
	})
}

func logLines(t *testing.T, log []msg) {
	for _, m := range log {
		t.Logf("%d %s %s %q id %q", m.T, m.Kind, m.Type, m.Data, m.lastID()+m.ID)
	}
}

func hasTick(log []msg, n int) bool {
	want := strconv.Itoa(n)
	for _, m := range log {
		if m.Kind == "event" && m.Data == want {
			return true
		}
	}
	return false
}

// The npm package @microsoft/fetch-event-source: POST with headers and a
// JSON body to the app, which names the channel; ids, retry, resume across
// server closes, no empty messages for comments, close then 204; and a
// refused stream stays refused.
func TestFetchEventSourcePackage(t *testing.T) {
	caddyproc.SkipShort(t)
	s := start(t)
	body := `{"room":"r1","question":"why is the sky blue?"}`

	t.Run("refused", func(t *testing.T) {
		fe := startNode(t, "fetch-event-source.mjs", s.caddy.URL()+"/chat", "bad-token", body)
		if c := fe.next(10 * time.Second); c.Kind != "connect" || c.Method != "POST" {
			t.Fatalf("got %+v", c)
		}
		if m := fe.next(10 * time.Second); m.Kind != "open" || m.Status != http.StatusUnauthorized {
			t.Fatalf("got %+v, want the app's 401", m)
		}
		if m := fe.next(5 * time.Second); m.Kind != "fatal" || !strings.Contains(m.Message, "bad token") {
			t.Fatalf("got %+v", m)
		}
	})

	t.Run("stream", func(t *testing.T) {
		before := len(s.app.requests())
		fe := startNode(t, "fetch-event-source.mjs", s.caddy.URL()+"/chat", "good-token", body)
		log := fe.until("open", 10*time.Second)
		if open := log[len(log)-1]; open.Status != 200 || open.ContentType != "text/event-stream; charset=utf-8" {
			t.Fatalf("open: %+v", open)
		}
		ids := collectIDs(t, publishTicks(s.rdb, "chat:r1", 60, 50*time.Millisecond))
		for !hasTick(log, len(ids)) {
			log = append(log, fe.next(10*time.Second))
		}
		checkResume(t, log, ids, "close")
		if t.Failed() {
			logLines(t, log)
		}

		// The first event of each connection carries the retry sent at
		// stream start (a retry line with no blank line after it, so no
		// empty message of its own).
		afterOpen := false
		for _, m := range log {
			switch m.Kind {
			case "open":
				afterOpen = true
			case "event":
				if afterOpen && (m.Retry == nil || *m.Retry != retryMS) {
					got := "none"
					if m.Retry != nil {
						got = strconv.Itoa(*m.Retry)
					}
					t.Errorf("first event after open: retry %s, want %d", got, retryMS)
				}
				afterOpen = false
			}
		}

		// The app saw every (re)connection as fetch-event-source sent it.
		reqs := s.app.requests()[before:]
		connects := 0
		for _, m := range log {
			if m.Kind == "connect" {
				connects++
			}
		}
		if len(reqs) < connects {
			t.Fatalf("the app saw %d requests for %d connections", len(reqs), connects)
		}
		for i, r := range reqs[:connects] {
			if r.Authorization != "Bearer good-token" || r.ContentType != "application/json" || r.Body != body {
				t.Fatalf("request %d reached the app as %+v", i, r)
			}
			if (i == 0) != (r.LastEventID == "") {
				t.Fatalf("request %d carried Last-Event-ID %q", i, r.LastEventID)
			}
		}

		// The publisher ends the answer: the done event, then the stream
		// ends; the reconnect gets 204, which this client treats as final.
		id, err := s.rdb.FCall(context.Background(), "sse_publish", []string{"chat:r1"},
			`{"event":"done","data":"bye","close":true}`).Result()
		if err != nil {
			t.Fatal(err)
		}
		tail := fe.until("fatal", 10*time.Second)
		var done *msg
		for i, m := range tail {
			if m.Kind == "event" && m.Type == "done" {
				done = &tail[i]
			}
		}
		if done == nil || done.Data != "bye" || done.ID != fmt.Sprint(id) {
			t.Fatalf("no done event with id %v in %+v", id, tail)
		}
		if opened := tail[len(tail)-2]; opened.Kind != "open" || opened.Status != http.StatusNoContent {
			t.Fatalf("the last reconnect got %+v, want 204", opened)
		}
	})
}

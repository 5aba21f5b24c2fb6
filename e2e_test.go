package caddysse_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

// globalOptions are caddyproc's with Caddy's HTTP metrics on, per host, as
// production sites run them.
var globalOptions = strings.Replace(caddyproc.GlobalOptions, "persist_config off\n",
	"persist_config off\n\tmetrics {\n\t\tper_host\n\t}\n", 1)

var coreCaddyfile = globalOptions + `
http://127.0.0.1:{HTTP} {
	log
	header /path/* Access-Control-Allow-Origin "https://app.example"
	sse /path/* {
		redis {REDIS}
		channel user:{path.1}
	}
	sse /standard/* {
		redis {REDIS}
		channel user:{path.1}
		takeover off
	}
	sse /query {
		redis {REDIS}
		channel room:{query.room}
		allow room:[a-z0-9]+
	}
	sse /header {
		redis {REDIS}
		channel {header.X-Channels}
		max_channels 3
	}
	sse /envelope {
		redis {REDIS}
		channel env:{query.c}
		format envelope
		keepalive 300ms
		retry 2500ms
	}
	sse /limited {
		redis {REDIS}
		channel limited
		max_connections 2
	}
	sse /slow {
		redis {REDIS}
		channel slow
		buffer 8
	}
	respond "app" 200
}
`

type env struct {
	redis *redistest.Server
	rdb   *redis.Client
	caddy *caddyproc.Instance
}

func startCore(t *testing.T) *env {
	t.Helper()
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	in := caddyproc.Start(t, coreCaddyfile, caddyproc.Options{"{REDIS}": rs.URL()})
	return &env{redis: rs, rdb: rs.Client(), caddy: in}
}

func (e *env) open(t *testing.T, path string, header ...string) *sseclient.Stream {
	t.Helper()
	return ssetest.Open(t, e.caddy.URL()+path, header...)
}

func (e *env) publish(t *testing.T, channel, payload string) int64 {
	t.Helper()
	return ssetest.Publish(t, e.rdb, channel, payload)
}

func TestStreamHeadersAndFirstComment(t *testing.T) {
	e := startCore(t)
	s := e.open(t, "/path/42")
	h := s.Resp.Header
	for name, want := range map[string]string{
		"Content-Type":      "text/event-stream; charset=utf-8",
		"Cache-Control":     "no-cache",
		"X-Accel-Buffering": "no",
		// Headers set by handlers before sse are kept.
		"Access-Control-Allow-Origin": "https://app.example",
	} {
		if got := h.Get(name); got != want {
			t.Errorf("%s = %q, want %q", name, got, want)
		}
	}
	// The opening comment arrives before any event.
	deadline := time.Now().Add(3 * time.Second)
	for s.Comments() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := s.Raw(); got != ":\n" {
		t.Fatalf("stream start = %q, want %q", got, ":\n")
	}
}

// Both ways of writing an HTTP/1.1 stream deliver the same bytes: taken
// over (the default) and through Caddy's response writer (takeover off).
func TestTakeoverAndStandardWriterAgree(t *testing.T) {
	e := startCore(t)
	taken := e.open(t, "/path/same")
	standard := e.open(t, "/standard/same")
	ssetest.WaitNumsub(t, e.rdb, "user:same", 1, 5*time.Second)
	for _, p := range []string{"one", "two\nlines", ""} {
		e.publish(t, "user:same", p)
	}
	for _, s := range []*sseclient.Stream{taken, standard} {
		for _, want := range []string{"one", "two\nlines", ""} {
			if ev := ssetest.Next(t, s); ev.Data != want {
				t.Fatalf("got %+v, want %q", ev, want)
			}
		}
	}
	if a, b := taken.Raw(), standard.Raw(); a != b {
		t.Fatalf("taken over: %q\nstandard:  %q", a, b)
	}
	if taken.Resp.Header.Get("Content-Type") != standard.Resp.Header.Get("Content-Type") {
		t.Fatal("the two writers sent different Content-Types")
	}
	// Closing the client unsubscribes promptly on both.
	taken.Close()
	standard.Close()
	ssetest.WaitNumsub(t, e.rdb, "user:same", 0, 5*time.Second)
}

func TestPublishReachesExactlyTheSubscribedStreams(t *testing.T) {
	e := startCore(t)
	a1 := e.open(t, "/path/1")
	a2 := e.open(t, "/path/1")
	b := e.open(t, "/path/2")
	q := e.open(t, "/query?room=lobby")
	hd := e.open(t, "/header", "X-Channels", "alpha, beta")

	if n := e.publish(t, "user:1", "hello one"); n != 1 {
		t.Fatalf("PUBLISH user:1 reached %d subscriptions, want 1 (one per instance)", n)
	}
	for _, s := range []*sseclient.Stream{a1, a2} {
		if ev := ssetest.Next(t, s); ev.Data != "hello one" || ev.Event != "message" {
			t.Fatalf("got %+v", ev)
		}
	}
	e.publish(t, "user:2", "hello two")
	ssetest.Expect(t, b, "hello two")
	e.publish(t, "room:lobby", "in the lobby")
	ssetest.Expect(t, q, "in the lobby")
	e.publish(t, "beta", "b")
	e.publish(t, "alpha", "a")
	ssetest.Expect(t, hd, "b", "a")
	// Nobody received what was not theirs.
	ssetest.NoEvent(t, a1, 200*time.Millisecond)
	ssetest.NoEvent(t, b, 10*time.Millisecond)
	ssetest.NoEvent(t, q, 10*time.Millisecond)
}

func TestMultiLinePayloadArrivesIntact(t *testing.T) {
	e := startCore(t)
	s := e.open(t, "/path/ml")
	cases := []struct{ payload, want string }{
		{"line one\nline two", "line one\nline two"},
		{"a\r\nb\rc\nd", "a\nb\nc\nd"},
		{" leading space", " leading space"},
		{"", ""},
		{"x\rid: 9", "x\nid: 9"},
		{"trailing\n", "trailing\n"},
		{`{"json":"value"}`, `{"json":"value"}`},
	}
	for _, c := range cases {
		e.publish(t, "user:ml", c.payload)
		ev := ssetest.Next(t, s)
		if ev.Data != c.want || ev.ID != "" || ev.Event != "message" {
			t.Errorf("payload %q: got %+v, want data %q and no id", c.payload, ev, c.want)
		}
	}
}

func TestEnvelopeSetsFieldsAndNeverInjects(t *testing.T) {
	e := startCore(t)
	s := e.open(t, "/envelope?c=1")
	if !strings.Contains(waitRaw(t, s, "retry: 2500\n"), "retry: 2500\n") {
		t.Fatalf("no retry hint at stream start: %q", s.Raw())
	}
	e.publish(t, "env:1", `{"event":"chat","id":"m-1","data":{"text":"hi"},"retry":1000}`)
	ev := ssetest.Next(t, s)
	if ev.Event != "chat" || ev.ID != "m-1" || ev.Data != `{"text":"hi"}` || ev.Retry != "1000" {
		t.Fatalf("got %+v", ev)
	}
	e.publish(t, "env:1", `{"data":"two\nlines"}`)
	if ev := ssetest.Next(t, s); ev.Data != "two\nlines" || ev.Event != "message" {
		t.Fatalf("got %+v", ev)
	}
	// CR and LF in event or id must not start a field of their own.
	e.publish(t, "env:1", `{"event":"x\nid: evil\ndata: injected","id":"a\rretry: 1","data":"safe"}`)
	ev = ssetest.Next(t, s)
	if ev.Data != "safe" || strings.Contains(ev.ID, "\n") || ev.Retry != "1000" {
		t.Fatalf("got %+v", ev)
	}
	ssetest.NoEvent(t, s, 200*time.Millisecond)
	// A payload that is not an envelope is delivered raw, not dropped.
	e.publish(t, "env:1", `not json`)
	ssetest.Expect(t, s, "not json")
}

func waitRaw(t *testing.T, s *sseclient.Stream, want string) string {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if raw := s.Raw(); strings.Contains(raw, want) {
			return raw
		}
		time.Sleep(10 * time.Millisecond)
	}
	return s.Raw()
}

func TestKeepaliveOnlyOnSilence(t *testing.T) {
	e := startCore(t)
	s := e.open(t, "/envelope?c=ka")
	waitRaw(t, s, ":\n")
	start := s.Comments()
	time.Sleep(1100 * time.Millisecond)
	if got := s.Comments() - start; got < 2 {
		t.Fatalf("%d keepalive comments in 1.1s of silence with keepalive 300ms, want at least 2", got)
	}
	// While events flow faster than the keepalive, no comment is sent.
	before := s.Comments()
	for i := 0; i < 12; i++ {
		e.publish(t, "env:ka", fmt.Sprintf(`{"data":"%d"}`, i))
		ssetest.Next(t, s)
		time.Sleep(100 * time.Millisecond)
	}
	if got := s.Comments() - before; got != 0 {
		t.Fatalf("%d keepalive comments while events flowed every 100ms", got)
	}
	// Comments are bare ":" lines with no blank line after them.
	if strings.Contains(s.Raw(), ":\n\n") {
		t.Fatalf("a comment was followed by a blank line: %q", s.Raw())
	}
}

func TestRefusals(t *testing.T) {
	e := startCore(t)
	check := func(method, path string, header http.Header, status int, body string) *http.Response {
		t.Helper()
		req, _ := http.NewRequest(method, e.caddy.URL()+path, nil)
		for k, v := range header {
			req.Header[k] = v
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != status || !strings.Contains(string(b), body) {
			t.Fatalf("%s %s: %d %q, want %d with %q", method, path, resp.StatusCode, b, status, body)
		}
		if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
			t.Fatalf("%s %s: Content-Type %q, want text/plain", method, path, ct)
		}
		return resp
	}
	resp := check(http.MethodPut, "/path/1", nil, http.StatusMethodNotAllowed, "method")
	if allow := resp.Header.Get("Allow"); allow != "GET, POST" {
		t.Fatalf("Allow = %q", allow)
	}
	check(http.MethodGet, "/query", nil, http.StatusBadRequest, "no channel")
	check(http.MethodGet, "/header", http.Header{"X-Channels": {" , "}}, http.StatusBadRequest, "no channel")
	check(http.MethodGet, "/query?room=Lobby!", nil, http.StatusForbidden, "not allowed")
	check(http.MethodGet, "/header", http.Header{"X-Channels": {"a,b,c,d"}}, http.StatusBadRequest, "too many")

	// Refused requests subscribed nothing.
	chans, err := e.rdb.PubSubChannels(context.Background(), "*").Result()
	if err != nil || len(chans) != 0 {
		t.Fatalf("channels subscribed after refusals: %v %v", chans, err)
	}

	// max_connections: the third concurrent stream gets 503 with Retry-After.
	e.open(t, "/limited")
	e.open(t, "/limited")
	resp = check(http.MethodGet, "/limited", nil, http.StatusServiceUnavailable, "too many")
	if resp.Header.Get("Retry-After") == "" {
		t.Fatal("503 without Retry-After")
	}

	// POST is a stream too (fetch-event-source).
	req, _ := http.NewRequest(http.MethodPost, e.caddy.URL()+"/path/post", strings.NewReader(`{"q":1}`))
	req.Header.Set("Content-Type", "application/json")
	s, err := sseclient.Open(context.Background(), nil, req)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	e.publish(t, "user:post", "via post")
	ssetest.Expect(t, s, "via post")

	// Everything else passes through to the rest of the site.
	r2, err := http.Get(e.caddy.URL() + "/other")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(r2.Body)
	r2.Body.Close()
	if string(b) != "app" {
		t.Fatalf("other path answered %q", b)
	}
}

func TestSlowClientIsCutOffAndOthersContinue(t *testing.T) {
	e := startCore(t)
	fast := e.open(t, "/slow")
	// The slow client opens the stream and then never reads: its socket
	// buffers fill and its queue (buffer 8) overflows.
	slowReq, _ := http.NewRequest(http.MethodGet, e.caddy.URL()+"/slow", nil)
	slowResp, err := http.DefaultTransport.RoundTrip(slowReq)
	if err != nil {
		t.Fatal(err)
	}
	defer slowResp.Body.Close()
	ssetest.WaitNumsub(t, e.rdb, "slow", 1, 5*time.Second)

	payload := strings.Repeat("x", 16<<10)
	const events = 400 // 6.4 MB: more than loopback socket buffers hold
	for i := 0; i < events; i++ {
		e.publish(t, "slow", fmt.Sprintf("%d %s", i, payload))
		ev := ssetest.Next(t, fast)
		if !strings.HasPrefix(ev.Data, fmt.Sprintf("%d ", i)) {
			t.Fatalf("fast client got event %.10q, want number %d", ev.Data, i)
		}
	}
	// The slow stream was closed: reading it now ends (after what the
	// buffers held) instead of blocking forever.
	done := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, slowResp.Body)
		done <- err
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("the slow stream was not closed")
	}
	if err := e.caddy.Reload(coreCaddyfile, caddyproc.Options{"{REDIS}": e.redis.URL()}); err != nil {
		t.Fatal(err)
	}
	// The channel stays subscribed once for the instance while the fast
	// stream lives, and is unsubscribed when it leaves.
	ssetest.WaitNumsub(t, e.rdb, "slow", 1, 5*time.Second)
	fast.Close()
	ssetest.WaitNumsub(t, e.rdb, "slow", 0, 5*time.Second)
}

func TestSubscriptionCountFollowsStreams(t *testing.T) {
	e := startCore(t)
	var streams []*sseclient.Stream
	for i := 0; i < 5; i++ {
		streams = append(streams, e.open(t, "/path/count"))
	}
	ssetest.WaitNumsub(t, e.rdb, "user:count", 1, 5*time.Second)
	for _, s := range streams[:4] {
		s.Close()
	}
	ssetest.WaitNumsub(t, e.rdb, "user:count", 1, 5*time.Second)
	e.publish(t, "user:count", "still here")
	if ev := ssetest.Next(t, streams[4]); ev.Data != "still here" {
		t.Fatalf("got %+v", ev)
	}
	streams[4].Close()
	ssetest.WaitNumsub(t, e.rdb, "user:count", 0, 5*time.Second)
	// Coming back subscribes again, and the first event after the stream
	// opened is never lost.
	for i := 0; i < 20; i++ {
		s := e.open(t, "/path/again")
		e.publish(t, "user:again", fmt.Sprint(i))
		if ev := ssetest.Next(t, s); ev.Data != fmt.Sprint(i) {
			t.Fatalf("got %+v", ev)
		}
		s.Close()
	}
}

func TestReloadKeepsStreams(t *testing.T) {
	e := startCore(t)
	s1 := e.open(t, "/path/r")
	s2 := e.open(t, "/query?room=r")
	vars := caddyproc.Options{"{REDIS}": e.redis.URL()}
	for i := 0; i < 3; i++ {
		if err := e.caddy.Reload(strings.Replace(coreCaddyfile, `respond "app" 200`, fmt.Sprintf(`respond "app %d" 200`, i), 1), vars); err != nil {
			t.Fatal(err)
		}
		e.publish(t, "user:r", fmt.Sprint("after reload ", i))
		e.publish(t, "room:r", fmt.Sprint("after reload ", i))
		for _, s := range []*sseclient.Stream{s1, s2} {
			if ev := ssetest.Next(t, s); ev.Data != fmt.Sprint("after reload ", i) {
				t.Fatalf("got %+v", ev)
			}
		}
	}
	ssetest.WaitNumsub(t, e.rdb, "user:r", 1, 5*time.Second)
}

func TestMetrics(t *testing.T) {
	e := startCore(t)
	s := e.open(t, "/path/m")
	e.publish(t, "user:m", "one")
	ssetest.Next(t, s)
	waitMetrics(t, e.caddy,
		"caddy_sse_streams_open 1",
		"caddy_sse_events_delivered_total 1",
		"caddy_sse_redis_connected 1",
		"caddy_sse_channels_subscribed 1",
	)
}

// waitMetrics waits until every line is in the admin endpoint's metrics: the
// counters are updated right after the write the client sees.
func waitMetrics(t *testing.T, in *caddyproc.Instance, lines ...string) {
	t.Helper()
	ssetest.WaitMetricLines(t, in.AdminURL()+"/metrics", 5*time.Second, lines...)
}

// With the site's access log and per-host metrics on (what production sites
// run), a stream is a 200 in the access log and in Caddy's HTTP metrics,
// whichever path writes it, and -race finds nothing (the harness fails the
// test on a race report in Caddy's output).
func TestAccessLogRecordsStreams(t *testing.T) {
	e := startCore(t)
	for path, ch := range map[string]string{"/path/log1": "user:log1", "/standard/log2": "user:log2"} {
		s := e.open(t, path)
		for i := 0; i < 20; i++ {
			e.publish(t, ch, fmt.Sprint(i))
		}
		for i := 0; i < 20; i++ {
			if _, err := s.Next(5 * time.Second); err != nil {
				t.Fatalf("%s: event %d: %v", path, i, err)
			}
		}
		s.Close()
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		logs := e.caddy.Logs()
		ok := true
		for _, path := range []string{"/path/log1", "/standard/log2"} {
			if !accessLogged(logs, path, 200) {
				ok = false
			}
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("access log lacks status 200 for both streams:\n%s", ssetest.Lines(logs, "http.log.access"))
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Both streams count as 200s in Caddy's own HTTP metrics (the site
	// served no other request).
	body := ssetest.Metrics(t, e.caddy.AdminURL()+"/metrics")
	var n float64
	for _, l := range strings.Split(body, "\n") {
		if strings.HasPrefix(l, "caddy_http_request_duration_seconds_count{") && strings.Contains(l, `code="200"`) {
			var v float64
			fmt.Sscan(l[strings.LastIndexByte(l, ' ')+1:], &v)
			n += v
		}
	}
	if n < 2 {
		t.Fatalf("requests with code 200 in Caddy's HTTP metrics: %v, want 2:\n%s", n, ssetest.Lines(body, "caddy_http_request_duration_seconds_count"))
	}
}

// accessLogged reports whether Caddy's access log has a line for uri with
// status.
func accessLogged(logs, uri string, status int) bool {
	for _, line := range strings.Split(logs, "\n") {
		if !strings.Contains(line, `"logger":"http.log.access`) {
			continue
		}
		var entry struct {
			Request struct{ URI string }
			Status  int
		}
		if json.Unmarshal([]byte(line), &entry) == nil && entry.Request.URI == uri && entry.Status == status {
			return true
		}
	}
	return false
}

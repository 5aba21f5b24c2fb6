package clients

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
)

// helperSecret signs the test's tokens (HS256, at least 32 bytes).
const helperSecret = "caddy-sse-browser-helper-test-secret-0123456789"

// helperCaddyfile serves the browser helper (client/caddy-sse.js, with
// file_server as the README shows), a test page that uses it, and the
// streams the page opens:
//
//	/es/<name>     resumable, envelopes, retry 300ms; names must be lower case
//	/short/<name>  the same, closed by the server every 1.5s (max_duration)
//	/user/<name>   one stream per name: a newer one evicts the older
//	/jwt/<name>    needs a token granting j:<name>
const helperCaddyfile = caddyproc.GlobalOptions + `
http://127.0.0.1:{HTTP} {
	log {
		output stderr
		format json
	}
	sse /es/* {
		redis {REDIS}
		channel h:{path.1}
		allow h:[a-z0-9-]+
		format envelope
		history 1000 10m
		retry 300ms
	}
	sse /short/* {
		redis {REDIS}
		channel h:{path.1}
		format envelope
		history 1000 10m
		retry 400ms
		max_duration 1500ms
	}
	sse /user/* {
		redis {REDIS}
		channel u:{path.1}
		format envelope
		retry 300ms
		max_connections_per {path.1} 1 evict_oldest
	}
	sse /jwt/* {
		redis {REDIS}
		channel j:{path.1}
		format envelope
		retry 300ms
		jwt {
			key {SECRET}
		}
	}
	handle /caddy-sse.js {
		root * {CLIENT}
		file_server
	}
	handle {
		root * {PAGE}
		file_server
	}
}
`

// pageRecord is what the test page recorded of one stream (window.record).
type pageRecord struct {
	Events []struct {
		Type string `json:"type"`
		Data string `json:"data"`
		ID   string `json:"id"`
		T    int64  `json:"t"`
	} `json:"events"`
	States []struct {
		State string `json:"state"`
		T     int64  `json:"t"`
	} `json:"states"`
	Opens []struct {
		Reconnected bool  `json:"reconnected"`
		T           int64 `json:"t"`
	} `json:"opens"`
	Missed []struct {
		After  string `json:"after"`
		Before int    `json:"before"`
	} `json:"missed"`
	Refreshes []struct {
		Attempt int   `json:"attempt"`
		T       int64 `json:"t"`
	} `json:"refreshes"`
	End *struct {
		Reason string `json:"reason"`
		Status int    `json:"status"`
		Error  string `json:"error"`
		Body   string `json:"body"`
		T      int64  `json:"t"`
	} `json:"end"`
	State       string `json:"state"`
	LastEventID string `json:"lastEventId"`
}

func (r pageRecord) data() []string {
	var out []string
	for _, e := range r.Events {
		out = append(out, e.Data)
	}
	return out
}

// helperEnv is the stack of the browser helper tests: Redis, Caddy, a page.
type helperEnv struct {
	t     *testing.T
	rs    *redistest.Server
	caddy *caddyproc.Instance
	p     *pages
	mode  string // "eventsource" or "fetch"
}

func (e *helperEnv) start(name, url string, opts map[string]any) {
	e.t.Helper()
	opts["transport"] = e.mode
	var transport string
	e.p.call(e.t, &transport, "start", name, url, opts)
	if transport != e.mode {
		e.t.Fatalf("%s: the helper chose transport %q, want %q", name, transport, e.mode)
	}
}

func (e *helperEnv) record(name string) pageRecord {
	e.t.Helper()
	var r pageRecord
	e.p.call(e.t, &r, "record", name)
	return r
}

func (e *helperEnv) wait(name, cond string, timeout time.Duration) {
	e.t.Helper()
	e.p.wait(e.t, fmt.Sprintf("(() => { const r = record(%q); return %s; })()", name, cond), timeout)
}

func (e *helperEnv) stop(name string) { e.p.call(e.t, nil, "stop", name) }

func (e *helperEnv) publish(channel, payload string) {
	e.t.Helper()
	if err := e.rs.Client().Publish(context.Background(), channel, payload).Err(); err != nil {
		e.t.Fatal(err)
	}
}

func (e *helperEnv) fcall(channel, payload string, args ...any) string {
	e.t.Helper()
	id, err := e.rs.Client().FCall(context.Background(), "sse_publish", []string{channel}, append([]any{payload}, args...)...).Result()
	if err != nil {
		e.t.Fatalf("FCALL sse_publish %s: %v", channel, err)
	}
	return fmt.Sprint(id)
}

func helperToken(t *testing.T, channel string, exp time.Time) string {
	t.Helper()
	s, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{
		"sub": "tester", "exp": exp.Unix(), "channels": []string{channel},
	}).SignedString([]byte(helperSecret))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// The browser helper (client/caddy-sse.js) in Chromium, over EventSource and
// over fetch.
func TestBrowserHelperChromium(t *testing.T) {
	caddyproc.SkipShort(t)
	testBrowserHelper(t, "chromium")
}

// The same in Firefox ESR, driven over WebDriver BiDi.
func TestBrowserHelperFirefox(t *testing.T) {
	caddyproc.SkipShort(t)
	testBrowserHelper(t, "firefox")
}

func testBrowserHelper(t *testing.T, which string) {
	rs := redistest.Start(t)
	client, err := filepath.Abs(filepath.Join("..", "..", "client"))
	if err != nil {
		t.Fatal(err)
	}
	page, err := filepath.Abs("helper-page")
	if err != nil {
		t.Fatal(err)
	}
	in := caddyproc.Start(t, helperCaddyfile, caddyproc.Options{
		"{REDIS}": rs.URL(), "{CLIENT}": client, "{PAGE}": page, "{SECRET}": helperSecret,
	})
	redistest.WaitLibrary(t, rs.Client(), "caddy_sse")
	p := startPages(t, which)
	if status := p.goTo(t, in.URL()+"/"); status != 200 {
		t.Fatalf("test page: %d", status)
	}
	p.wait(t, "window.helperReady === true", 30*time.Second)

	for _, mode := range []string{"eventsource", "fetch"} {
		e := &helperEnv{t: t, rs: rs, caddy: in, p: p, mode: mode}
		helperResumes(e)
		helperReportsMissed(e)
		helperStopsWhenEvicted(e)
		helperStopsOn204(e)
		helperStopsOnRefusal(e)
		helperRefreshesToken(e)
		helperGivesUpRefreshing(e)
	}
}

// The server closes the stream every 1.5 s (max_duration); the helper
// reconnects after the server's `retry` (400 ms, where its own default
// would be 5 s) with the last event id, and every event arrives once, in
// order. In fetch mode the stream is a POST with a header and a body, and
// so is every reconnect.
func helperResumes(e *helperEnv) {
	t := e.t
	name := "resume-" + e.mode
	path := "/short/r-" + e.mode
	opts := map[string]any{"types": []string{"tick"}, "retry": 5000}
	if e.mode == "fetch" {
		opts["method"] = "POST"
		opts["headers"] = map[string]string{"X-Request": "helper", "Content-Type": "application/json"}
		opts["body"] = `{"want":"ticks"}`
	}
	e.start(name, path, opts)
	e.wait(name, "r.opens.length >= 1", 15*time.Second)
	const n = 12
	ids := collectIDs(t, publishTicks(e.rs.Client(), "h:r-"+e.mode, n, 250*time.Millisecond))
	e.wait(name, fmt.Sprintf("r.events.length >= %d", n), 20*time.Second)
	time.Sleep(300 * time.Millisecond) // anything extra would show now
	r := e.record(name)
	e.stop(name)

	if len(r.Events) != n {
		t.Fatalf("%s: %d events %q, want %d", name, len(r.Events), r.data(), n)
	}
	for i, ev := range r.Events {
		if ev.Data != strconv.Itoa(i+1) || ev.ID != ids[i] {
			t.Fatalf("%s: event %d is %q with id %q, want %d with id %s (all: %q)", name, i, ev.Data, ev.ID, i+1, ids[i], r.data())
		}
	}
	if len(r.Opens) < 2 {
		t.Fatalf("%s: opened %d times in %d ms, want reconnects after the server's closes", name, len(r.Opens), r.Events[n-1].T-r.Opens[0].T)
	}
	// Each reconnect waits the server's retry (400 ms), not the page's 5 s.
	for _, o := range r.Opens[1:] {
		var lost int64
		for _, s := range r.States {
			if s.State == "reconnecting" && s.T <= o.T {
				lost = s.T
			}
		}
		if lost == 0 {
			t.Fatalf("%s: reopened at %d without reconnecting first: %+v", name, o.T, r.States)
		}
		if gap := o.T - lost; gap < 300 || gap > 3000 {
			t.Fatalf("%s: reconnected %d ms after the stream ended, want about the server's retry of 400 ms", name, gap)
		}
		if !o.Reconnected {
			t.Fatalf("%s: onOpen after a reconnect says reconnected=false", name)
		}
	}
	if e.mode == "fetch" {
		reqs := requests(e.caddy.Logs(), path)
		if len(reqs) < 2 {
			t.Fatalf("%s: the access log has %d requests to %s", name, len(reqs), path)
		}
		for _, l := range reqs {
			if l.Request.Method != "POST" || l.Request.Headers["X-Request"] == nil {
				t.Fatalf("%s: a request was %s with headers %v, want POST with X-Request", name, l.Request.Method, l.Request.Headers)
			}
		}
	}
	t.Logf("%s: %d events over %d connections", name, n, len(r.Opens))
}

// A resume from an id older than what Redis kept: onMissed gets the id,
// before any event; then the retained events arrive, up to the newest.
func helperReportsMissed(e *helperEnv) {
	t := e.t
	name := "missed-" + e.mode
	channel := "h:m-" + e.mode
	old := e.fcall(channel, `{"data":"old"}`)
	for i := 0; i < 300; i++ {
		e.fcall(channel, fmt.Sprintf(`{"data":"%d"}`, i), 5)
	}
	e.start(name, "/es/m-"+e.mode, map[string]any{"lastEventId": old})
	e.wait(name, `r.events.some((ev) => ev.data === "299")`, 15*time.Second)
	r := e.record(name)
	e.stop(name)
	if len(r.Missed) != 1 || r.Missed[0].After != old || r.Missed[0].Before != 0 {
		t.Fatalf("%s: onMissed calls %+v, want one with after=%s before any event", name, r.Missed, old)
	}
	if len(r.Events) > 20 || r.Events[0].Data == "old" {
		t.Fatalf("%s: got %q, want only the few events Redis kept", name, r.data())
	}
}

// A second stream of the same user evicts the first: the first ends with
// "evicted" and never reconnects (which would evict the second in turn);
// the second stays open and receives.
func helperStopsWhenEvicted(e *helperEnv) {
	t := e.t
	a, b := "evicted-a-"+e.mode, "evicted-b-"+e.mode
	path := "/user/ev-" + e.mode
	e.start(a, path, map[string]any{})
	e.wait(a, "r.opens.length === 1", 15*time.Second)
	e.start(b, path, map[string]any{})
	e.wait(a, "r.end !== null", 15*time.Second)
	// The server's retry is 300 ms: a reconnect would have happened by now.
	time.Sleep(1500 * time.Millisecond)
	e.publish("u:ev-"+e.mode, `{"data":"for the newest tab"}`)
	e.wait(b, `r.events.some((ev) => ev.data === "for the newest tab")`, 10*time.Second)
	ra, rb := e.record(a), e.record(b)
	e.stop(b)
	if ra.End.Reason != "evicted" || ra.State != "closed" || len(ra.Opens) != 1 || len(ra.Events) != 0 {
		t.Fatalf("%s: end %+v, state %s, %d opens, events %q; want evicted, closed, 1 open, none", a, ra.End, ra.State, len(ra.Opens), ra.data())
	}
	if rb.End != nil || rb.State != "open" || len(rb.Opens) != 1 {
		t.Fatalf("%s: end %+v, state %s, %d opens; want open once and still open", b, rb.End, rb.State, len(rb.Opens))
	}
}

// The publisher closes the only channel: the page gets the last event, the
// reconnect gets 204, and the helper stops for good ("done").
func helperStopsOn204(e *helperEnv) {
	t := e.t
	name := "done-" + e.mode
	path := "/es/d-" + e.mode
	e.start(name, path, map[string]any{"types": []string{"bye"}})
	e.wait(name, "r.opens.length === 1", 15*time.Second)
	e.publish("h:d-"+e.mode, `{"event":"bye","data":"that was all","close":true}`)
	e.wait(name, "r.end !== null", 15*time.Second)
	time.Sleep(300 * time.Millisecond)
	before := requests(e.caddy.Logs(), path)
	time.Sleep(1500 * time.Millisecond)
	after := requests(e.caddy.Logs(), path)
	r := e.record(name)
	if r.End.Reason != "done" || r.End.Status != 204 || len(r.Events) != 1 || r.Events[0].Data != "that was all" {
		t.Fatalf("%s: end %+v, events %q; want done (204) after the bye event", name, r.End, r.data())
	}
	// The stream itself, then one 204 (fetch) or two (the browser's own
	// reconnect, then the helper's question why EventSource stopped).
	statuses := func(ls []accessLog) []int {
		var out []int
		for _, l := range ls {
			out = append(out, l.Status)
		}
		return out
	}
	got := statuses(after)
	if len(after) != len(before) || len(got) < 2 || len(got) > 3 || got[0] == 204 || got[1] != 204 || got[len(got)-1] != 204 {
		t.Fatalf("%s: statuses %v, then %v: want the stream, then a 204 or two, and nothing more", name, statuses(before), got)
	}
}

// A refusal other than 401 (here 403: the channel fails allow) ends the
// stream at once.
func helperStopsOnRefusal(e *helperEnv) {
	t := e.t
	name := "refused-" + e.mode
	e.start(name, "/es/NOT-ALLOWED", map[string]any{})
	e.wait(name, "r.end !== null", 15*time.Second)
	r := e.record(name)
	if r.End.Reason != "refused" || r.End.Status != 403 || len(r.Opens) != 0 {
		t.Fatalf("%s: end %+v after %d opens, want refused 403", name, r.End, len(r.Opens))
	}
	if !strings.Contains(r.End.Body, "not allowed") {
		t.Fatalf("%s: the page read %q from the refusal, want the server's reason", name, r.End.Body)
	}
}

// An expired token gets 401: refresh() gives a fresh one (in the URL for
// EventSource, in the Authorization header for fetch) and the stream opens.
func helperRefreshesToken(e *helperEnv) {
	t := e.t
	name := "refresh-" + e.mode
	path := "/jwt/k-" + e.mode
	expired := helperToken(t, "j:k-"+e.mode, time.Now().Add(-2*time.Minute))
	fresh := helperToken(t, "j:k-"+e.mode, time.Now().Add(10*time.Minute))
	opts := map[string]any{"tokens": []string{fresh}, "retry": 400}
	url := path
	if e.mode == "fetch" {
		opts["tokenIn"] = "header"
		opts["headers"] = map[string]string{"Authorization": "Bearer " + expired}
	} else {
		opts["tokenIn"] = "query"
		url += "?access_token=" + expired
	}
	e.start(name, url, opts)
	e.wait(name, "r.opens.length === 1", 15*time.Second)
	e.publish("j:k-"+e.mode, `{"data":"with a fresh token"}`)
	e.wait(name, `r.events.some((ev) => ev.data === "with a fresh token")`, 10*time.Second)
	r := e.record(name)
	e.stop(name)
	if len(r.Refreshes) != 1 || r.End != nil {
		t.Fatalf("%s: %d refreshes, end %+v; want one refresh and an open stream", name, len(r.Refreshes), r.End)
	}
}

// Tokens that keep failing: refresh() is called maxRefreshes times, backing
// off, then the stream ends "unauthorized".
func helperGivesUpRefreshing(e *helperEnv) {
	t := e.t
	name := "give-up-" + e.mode
	path := "/jwt/g-" + e.mode
	bad := func() string { return helperToken(t, "j:somewhere-else", time.Now().Add(10*time.Minute))[:40] + "x" }
	opts := map[string]any{"tokens": []string{bad(), bad(), bad()}, "maxRefreshes": 2, "retry": 400}
	url := path
	if e.mode == "fetch" {
		opts["tokenIn"] = "header"
		opts["headers"] = map[string]string{"Authorization": "Bearer " + bad()}
	} else {
		opts["tokenIn"] = "query"
		url += "?access_token=" + bad()
	}
	e.start(name, url, opts)
	e.wait(name, "r.end !== null", 15*time.Second)
	r := e.record(name)
	if r.End.Reason != "unauthorized" || r.End.Status != 401 || len(r.Opens) != 0 {
		t.Fatalf("%s: end %+v after %d opens, want unauthorized 401", name, r.End, len(r.Opens))
	}
	if len(r.Refreshes) != 2 {
		t.Fatalf("%s: refresh called %d times, want maxRefreshes = 2", name, len(r.Refreshes))
	}
	if gap := r.Refreshes[1].T - r.Refreshes[0].T; gap < 350 {
		t.Fatalf("%s: the second refresh came %d ms after the first, want a backoff of the retry (400 ms)", name, gap)
	}
}

// The helper's own parsing, in Node.js (fetch, no browser) against a server
// that sends hand-made bytes (helper-framing.mjs): a BOM and a comment,
// CR, LF and CRLF (a CRLF split across two reads), a UTF-8 character split
// across reads, an id with NUL (ignored), a field without a colon, an id
// alone (no event, but the resume point), an unfinished event at the end
// (dropped); then the reconnect after the server's `retry: 50` (not the
// page's 5 s) with Last-Event-ID 3, and 204 ends it. Then 503s: retried
// with backoff (Retry-After first) until maxRetries.
func TestBrowserHelperFraming(t *testing.T) {
	caddyproc.SkipShort(t)
	bin := requireNode(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "helper-framing.mjs")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("helper-framing.mjs: %v\n%s", err, stderr.String())
	}
	var got struct {
		Transport string `json:"transport"`
		Events    []struct {
			Type        string `json:"type"`
			Data        string `json:"data"`
			LastEventID string `json:"lastEventId"`
		} `json:"events"`
		End struct {
			Reason string `json:"reason"`
			Status int    `json:"status"`
		} `json:"end"`
		Requests []struct {
			LastEventID string `json:"lastEventId"`
			Accept      string `json:"accept"`
		} `json:"requests"`
		ReconnectAfterMS int64 `json:"reconnectAfterMs"`
		Busy             struct {
			Gaps []int64 `json:"gaps"`
			End  struct {
				Reason string `json:"reason"`
				Status int    `json:"status"`
				Body   string `json:"body"`
			} `json:"end"`
		} `json:"busy"`
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("helper-framing.mjs printed %q: %v", out, err)
	}
	want := [][3]string{{"message", "a", "1"}, {"x", " b\nc", "1"}, {"message", "é", "1"}, {"message", "nul", "1"}, {"message", "", "1"}}
	if len(got.Events) != len(want) {
		t.Fatalf("events %+v, want %q", got.Events, want)
	}
	for i, w := range want {
		if e := got.Events[i]; e.Type != w[0] || e.Data != w[1] || e.LastEventID != w[2] {
			t.Fatalf("event %d: %+v, want %q", i, e, w)
		}
	}
	if got.Transport != "fetch" || len(got.Requests) != 2 || got.Requests[0].Accept != "text/event-stream" ||
		got.Requests[0].LastEventID != "" || got.Requests[1].LastEventID != "3" {
		t.Fatalf("transport %s, requests %+v: want fetch, then a reconnect with Last-Event-ID 3", got.Transport, got.Requests)
	}
	if got.ReconnectAfterMS < 40 || got.ReconnectAfterMS > 2000 {
		t.Fatalf("reconnected %d ms after the end, want the server's retry of 50 ms", got.ReconnectAfterMS)
	}
	if got.End.Reason != "done" || got.End.Status != 204 {
		t.Fatalf("end %+v, want done (204)", got.End)
	}
	// 503s: retried after the Retry-After (1 s), then after retry (100 ms)
	// doubled each time; lost after maxRetries (3), the body readable.
	b := got.Busy
	if len(b.Gaps) != 3 || b.Gaps[0] < 950 || b.Gaps[1] < 180 || b.Gaps[2] < 380 || b.Gaps[2] > 3000 {
		t.Fatalf("503s retried after %v ms, want about 1000, 200, 400", b.Gaps)
	}
	if b.End.Reason != "lost" || b.End.Status != 503 || b.End.Body != "busy" {
		t.Fatalf("after the retries: %+v, want lost with the last 503 and its body", b.End)
	}
}

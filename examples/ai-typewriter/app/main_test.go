package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
)

const testToken = "test-token"

// exampleCaddyfile is the shipped Caddyfile with only what a test must
// change replaced: its ports, the app's address, and global options that
// keep Caddy away from the user's admin port, trust store and saved config.
// Each replaced text must occur exactly once, so that an edit of the example
// that the test would silently not cover fails here instead.
//
// Caddy runs in a temporary folder here, so the browser helper's folder
// (relative to the repository's root in the example) becomes absolute.
// extra replacements change the example further, for one test.
func exampleCaddyfile(t *testing.T, extra ...[2]string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "Caddyfile"))
	if err != nil {
		t.Fatal(err)
	}
	client, err := filepath.Abs(filepath.Join("..", "..", "..", "client"))
	if err != nil {
		t.Fatal(err)
	}
	cf := string(b)
	for _, r := range append([][2]string{
		{"\tauto_https off\n", "\tauto_https off\n\tadmin 127.0.0.1:{ADMIN}\n\tskip_install_trust\n\tpersist_config off\n"},
		{"http://localhost:8000 {", "http://127.0.0.1:{HTTP} {"},
		{"reverse_proxy 127.0.0.1:8080 {", "reverse_proxy {APP} {"},
		{"root * client\n", "root * " + client + "\n"},
	}, extra...) {
		if n := strings.Count(cf, r[0]); n != 1 {
			t.Fatalf("the example Caddyfile has %q %d times, want once: update exampleCaddyfile", r[0], n)
		}
		cf = strings.Replace(cf, r[0], r[1], 1)
	}
	return cf
}

// stack is the example running: redis-server, the app (through run, as
// `go run` starts it) and Caddy with the example Caddyfile.
type stack struct {
	caddy *caddyproc.Instance
	app   string // the app's own address, bypassing Caddy
}

func startStack(t *testing.T, minDelay, maxDelay time.Duration, extra ...[2]string) *stack {
	t.Helper()
	rs := redistest.Start(t)
	appAddr := fmt.Sprintf("127.0.0.1:%d", caddyproc.FreePort(t))
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() {
		ran <- run(ctx, []string{
			"-listen", appAddr, "-redis", rs.URL(), "-token", testToken,
			"-min-delay", minDelay.String(), "-max-delay", maxDelay.String(),
		}, &testWriter{t: t})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-ran:
			if err != nil {
				t.Errorf("app: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("the app did not stop")
		}
	})
	waitListening(t, appAddr, ran)

	in := caddyproc.Start(t, exampleCaddyfile(t, extra...), caddyproc.Options{"{APP}": appAddr}, "REDIS_URL="+rs.URL())
	waitFunctions(t, rs.Client())
	return &stack{caddy: in, app: appAddr}
}

func waitListening(t *testing.T, addr string, ran <-chan error) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/")
		if err == nil {
			resp.Body.Close()
			return
		}
		select {
		case err := <-ran:
			t.Fatalf("the app exited: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the app does not answer on %s: %v", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitFunctions waits until Caddy has loaded sse_publish into Redis, as it
// does in the background when it starts.
func waitFunctions(t *testing.T, rdb *redis.Client) {
	t.Helper()
	redistest.WaitLibrary(t, rdb, "caddy_sse")
}

// testWriter sends the app's log to the test's.
type testWriter struct{ t *testing.T }

func (w *testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func (s *stack) chatRequest(t *testing.T, question string, header ...string) *http.Request {
	t.Helper()
	body, _ := json.Marshal(map[string]string{"question": question})
	req, err := http.NewRequest(http.MethodPost, s.caddy.URL()+"/chat", strings.NewReader(string(body)))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	return req
}

func (s *stack) openChat(t *testing.T, question string) *sseclient.Stream {
	t.Helper()
	st, err := sseclient.Open(context.Background(), nil, s.chatRequest(t, question, "Authorization", "Bearer "+testToken))
	if err != nil {
		t.Fatalf("POST /chat: %v", err)
	}
	t.Cleanup(st.Close)
	return st
}

// readAnswer reads chunk events until done and returns the text they make.
// It checks that every chunk is 1 to 3 characters and that every event
// carries an increasing id from which the page can resume.
func readAnswer(t *testing.T, st *sseclient.Stream, stopAfter int) (text string, last sseclient.Event) {
	t.Helper()
	var b strings.Builder
	var prevID string
	for n := 0; stopAfter <= 0 || n < stopAfter; n++ {
		ev, err := st.Next(10 * time.Second)
		if err != nil {
			t.Fatalf("after %q: %v (on the wire: %q)", b.String(), err, st.Raw())
		}
		if ev.ID == "" || len(ev.ID) < len(prevID) || len(ev.ID) == len(prevID) && ev.ID <= prevID {
			t.Fatalf("event id %q after %q: want increasing ids", ev.ID, prevID)
		}
		prevID = ev.ID
		last = ev
		switch ev.Event {
		case "chunk":
			if n := utf8.RuneCountInString(ev.Data); n < 1 || n > 3 {
				t.Fatalf("chunk %q has %d characters, want 1 to 3", ev.Data, n)
			}
			b.WriteString(ev.Data)
		case "done":
			if ev.Data != "" {
				t.Fatalf("done carries %q", ev.Data)
			}
			return b.String(), ev
		default:
			t.Fatalf("unexpected event %+v", ev)
		}
	}
	return b.String(), last
}

func TestChatStreamsTheAnswer(t *testing.T) {
	caddyproc.SkipShort(t)
	s := startStack(t, time.Millisecond, 3*time.Millisecond)
	question := "What happens on the wire? “quotes” & <tags>"
	st := s.openChat(t, question)
	if ct := st.Resp.Header.Get("Content-Type"); ct != "text/event-stream; charset=utf-8" {
		t.Fatalf("Content-Type %q, want an event stream", ct)
	}
	channel := st.Resp.Header.Get("X-Sse-Channel")
	id, ok := strings.CutPrefix(channel, "chat:")
	if !ok || !validChatID(id) {
		t.Fatalf("X-Sse-Channel %q: the page needs it to resume", channel)
	}
	text, _ := readAnswer(t, st, 0)
	if want := answerFor(question); text != want {
		t.Fatalf("typed\n%q\nwant\n%q", text, want)
	}
	// The close envelope ends the stream: the client sees a clean end.
	select {
	case <-st.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the stream did not end after done")
	}
	if err := st.Err(); err != io.EOF {
		t.Fatalf("the stream ended with %v, want a clean end", err)
	}
	// A reconnect to the finished answer is told to stop.
	resp := s.do(t, http.MethodGet, "/chat/"+id, "", "Authorization", "Bearer "+testToken, "Last-Event-ID", st.LastEventID())
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("reconnect after done: %d, want 204", resp.StatusCode)
	}
}

// A client that loses the stream resumes on GET /chat/<id> with its
// Last-Event-ID, as the page does: no chunk lost, none twice.
func TestChatResumes(t *testing.T) {
	caddyproc.SkipShort(t)
	s := startStack(t, 2*time.Millisecond, 5*time.Millisecond)
	question := "Can I resume?"
	st := s.openChat(t, question)
	id := strings.TrimPrefix(st.Resp.Header.Get("X-Sse-Channel"), "chat:")
	first, _ := readAnswer(t, st, 5)
	lastID := st.LastEventID()
	st.Close()

	req, _ := http.NewRequest(http.MethodGet, s.caddy.URL()+"/chat/"+id, nil)
	req.Header.Set("Authorization", "Bearer "+testToken)
	req.Header.Set("Last-Event-ID", lastID)
	again, err := sseclient.Open(context.Background(), nil, req)
	if err != nil {
		t.Fatalf("resume: %v", err)
	}
	defer again.Close()
	rest, _ := readAnswer(t, again, 0)
	if got, want := first+rest, answerFor(question); got != want {
		t.Fatalf("resumed answer\n%q\nwant\n%q", got, want)
	}
}

func TestChatNeedsTheSession(t *testing.T) {
	caddyproc.SkipShort(t)
	s := startStack(t, time.Millisecond, 3*time.Millisecond)
	for _, auth := range [][]string{nil, {"Authorization", "Bearer wrong"}, {"Cookie", "session=wrong"}} {
		resp, err := http.DefaultClient.Do(s.chatRequest(t, "hello?", auth...))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(string(body), "Please sign in") ||
			strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
			t.Fatalf("chat with %v: %d %q, want the app's own 401", auth, resp.StatusCode, body)
		}
	}
	if resp := s.do(t, http.MethodGet, "/chat/0123456789abcdef01234567", ""); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("follow without a session: %d, want 401", resp.StatusCode)
	}

	// The page, through Caddy, hands out the session cookie, which the
	// browser then sends with its POST.
	resp := s.do(t, http.MethodGet, "/", "")
	var cookie *http.Cookie
	for _, c := range resp.Cookies() {
		if c.Name == sessionCookie {
			cookie = c
		}
	}
	if resp.StatusCode != http.StatusOK || cookie == nil || !cookie.HttpOnly {
		t.Fatalf("page: %d, cookies %v", resp.StatusCode, resp.Cookies())
	}
	st, err := sseclient.Open(context.Background(), nil, s.chatRequest(t, "hello?", "Cookie", cookie.String()))
	if err != nil {
		t.Fatalf("chat with the page's cookie: %v", err)
	}
	defer st.Close()
	if text, _ := readAnswer(t, st, 0); text != answerFor("hello?") {
		t.Fatalf("typed %q", text)
	}
}

func TestChatRefusesBadRequests(t *testing.T) {
	caddyproc.SkipShort(t)
	s := startStack(t, time.Millisecond, 3*time.Millisecond)
	auth := []string{"Authorization", "Bearer " + testToken}
	for _, c := range []struct {
		method, path, body string
		want               int
	}{
		{http.MethodPost, "/chat", `{"question":"   "}`, http.StatusBadRequest},
		{http.MethodPost, "/chat", `not json`, http.StatusBadRequest},
		{http.MethodPost, "/chat", `{"question":"` + strings.Repeat("x", 5000) + `"}`, http.StatusBadRequest},
		{http.MethodGet, "/chat/not-hex", "", http.StatusNotFound},
		{http.MethodGet, "/chat/0123456789ABCDEF01234567", "", http.StatusNotFound},
		{http.MethodPut, "/chat", "", http.StatusMethodNotAllowed},
		{http.MethodGet, "/nothing", "", http.StatusNotFound},
	} {
		if resp := s.do(t, c.method, c.path, c.body, auth...); resp.StatusCode != c.want {
			t.Errorf("%s %s: %d, want %d", c.method, c.path, resp.StatusCode, c.want)
		}
	}
}

// Two chats at once are on two channels: each gets its own answer, whole.
func TestChatsAreIsolated(t *testing.T) {
	caddyproc.SkipShort(t)
	s := startStack(t, time.Millisecond, 3*time.Millisecond)
	questions := []string{"first question", "second question", "a third one"}
	streams := make([]*sseclient.Stream, len(questions))
	for i, q := range questions {
		streams[i] = s.openChat(t, q)
	}
	texts := make([]string, len(questions))
	var wg sync.WaitGroup
	for i := range streams {
		wg.Go(func() {
			// t.Fatal must not run off the test goroutine: read here, check below.
			var b strings.Builder
			for range 10000 {
				ev, err := streams[i].Next(10 * time.Second)
				if err != nil || ev.Event == "done" {
					break
				}
				b.WriteString(ev.Data)
			}
			texts[i] = b.String()
		})
	}
	wg.Wait()
	for i, q := range questions {
		if want := answerFor(q); texts[i] != want {
			t.Errorf("chat %d typed\n%q\nwant its own answer\n%q", i, texts[i], want)
		}
	}
}

func TestCleanQuestion(t *testing.T) {
	for in, want := range map[string]string{
		"  hi  ":                 "hi",
		"a\nb\tc":                "a b c",
		"bell\x07\x00":           "bell",
		strings.Repeat("é", 250): strings.Repeat("é", maxQuestion) + "…",
	} {
		if got := cleanQuestion(in); got != want {
			t.Errorf("cleanQuestion(%q) = %q, want %q", in, got, want)
		}
	}
}

// do sends a request through Caddy and returns the response, its body read.
func (s *stack) do(t *testing.T, method, path, body string, header ...string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(method, s.caddy.URL()+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	resp.Body.Close()
	return resp
}

// The headless Chromium test: the page, through Caddy, types the whole
// answer in order and makes no request after done; without a session it
// shows the app's 401 and stops. The browser is driven by browser.test.mjs
// (playwright-core); missing tools fail the test, never skip it.
func TestBrowser(t *testing.T) {
	caddyproc.SkipShort(t)
	runBrowserTest(t, "answer", startStack(t, 10*time.Millisecond, 30*time.Millisecond))
}

// The same page when the connection keeps dropping: here Caddy closes every
// stream after about 1.5 s (max_duration, added for this test). The page
// resumes on GET /chat/<id> with Last-Event-ID and still types the whole
// answer once, in order, then stops.
func TestBrowserResumes(t *testing.T) {
	caddyproc.SkipShort(t)
	s := startStack(t, 30*time.Millisecond, 60*time.Millisecond, [2]string{
		"last_event_id {rp.header.X-Sse-Last-Event-Id}\n",
		"last_event_id {rp.header.X-Sse-Last-Event-Id}\n\t\t\t\t\tmax_duration 1500ms\n",
	})
	runBrowserTest(t, "resume", s)
}

func runBrowserTest(t *testing.T, scenario string, s *stack) {
	t.Helper()
	dir, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	chromium := envOr("CHROMIUM_PATH", "/usr/bin/chromium")
	var missing []string
	if _, err := exec.LookPath("node"); err != nil {
		missing = append(missing, "node 20 or later, with npm (playwright-core needs 20)")
	}
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "playwright-core", "package.json")); err != nil {
		missing = append(missing, "playwright-core (npm ci --prefix examples/ai-typewriter)")
	}
	if _, err := os.Stat(chromium); err != nil {
		missing = append(missing, chromium+" (apt-get install -y chromium, or set CHROMIUM_PATH)")
	}
	if len(missing) > 0 {
		t.Fatalf("the browser test needs: %s", strings.Join(missing, "; "))
	}

	question := "Who holds my connection?"
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", "browser.test.mjs")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(),
		"BASE_URL="+s.caddy.URL(),
		"SCENARIO="+scenario,
		"QUESTION="+question,
		"EXPECTED="+answerFor(question),
		"CHROMIUM_PATH="+chromium,
	)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	t.Logf("browser.test.mjs:\n%s", out)
	if err != nil {
		t.Fatalf("browser.test.mjs: %v", err)
	}
}

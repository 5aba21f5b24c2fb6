package clients

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/outbuf"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
)

// chromiumPath is Debian's Chromium, which the tests drive.
const chromiumPath = "/usr/bin/chromium"

// browser runs browser.mjs: Chromium, headless, one page.
type browser struct{ n *node }

func startBrowser(t *testing.T, extraArgs ...string) *browser {
	t.Helper()
	requireNode(t)
	if _, err := os.Stat(chromiumPath); err != nil {
		t.Fatalf("%s not found: install Chromium with `apt-get install -y chromium`", chromiumPath)
	}
	n := startNode(t, "browser.mjs", extraArgs...)
	if m := n.next(60 * time.Second); m.Kind != "ready" {
		t.Fatalf("browser.mjs: %+v\n%s", m, n.stderr.String())
	}
	return &browser{n}
}

// do sends a command and returns its answer, failing the test on an error.
func (b *browser) do(t *testing.T, cmd map[string]any) msg {
	t.Helper()
	b.n.send(cmd)
	m := b.n.next(60 * time.Second)
	if m.Kind != "reply" || !m.OK || m.Error != "" {
		shot := filepath.Join(t.TempDir(), "page.png")
		b.n.send(map[string]any{"cmd": "screenshot", "path": shot})
		b.n.next(10 * time.Second)
		states := b.states(t)
		t.Fatalf("browser %v: %+v\nstates: %q\n(screenshot %s)\n%s", cmd, m, states, shot, b.n.stderr.String())
	}
	return m
}

func (b *browser) states(t *testing.T) []string {
	b.n.send(map[string]any{"cmd": "states"})
	return b.n.next(10 * time.Second).States
}

func (b *browser) waitState(t *testing.T, state string, timeout time.Duration) {
	t.Helper()
	b.do(t, map[string]any{"cmd": "waitState", "state": state, "timeoutMs": timeout.Milliseconds()})
}

func (b *browser) waitLog(t *testing.T, text string) {
	t.Helper()
	b.do(t, map[string]any{"cmd": "waitLog", "text": text, "timeoutMs": 10000})
}

// logCount counts the lines of the page's log that contain text.
func (b *browser) logCount(t *testing.T, text string) int {
	t.Helper()
	n := 0
	for _, l := range b.do(t, map[string]any{"cmd": "log"}).Log {
		if strings.Contains(l, text) {
			n++
		}
	}
	return n
}

// inOrder reports whether want occurs in states as a subsequence.
func inOrder(states []string, want ...string) bool {
	i := 0
	for _, s := range states {
		if i < len(want) && s == want[i] {
			i++
		}
	}
	return i == len(want)
}

// demo is a running cmd/sse-demo process.
type demo struct {
	cmd   *exec.Cmd
	out   *outbuf.Buffer
	done  chan struct{}
	redis string // the embedded Redis's address
}

// demoBinary builds cmd/sse-demo once.
func demoBinary(t *testing.T) string {
	t.Helper()
	return caddyproc.Build(t, "./cmd/sse-demo")
}

// TestMain removes the binaries the tests built.
func TestMain(m *testing.M) {
	caddyproc.Main(m)
}

var embeddedRedis = regexp.MustCompile(`embedded fake Redis on (127\.0\.0\.1:\d+)`)

// startDemo runs the demo as a user does (`go run ./cmd/sse-demo`, here
// built once), on addr, and waits until it listens.
func startDemo(t *testing.T, addr string) *demo {
	t.Helper()
	d := &demo{cmd: exec.Command(demoBinary(t), "-listen", addr), out: &outbuf.Buffer{}, done: make(chan struct{})}
	d.cmd.Stdout, d.cmd.Stderr = d.out, d.out
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		_ = d.cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(func() { d.stop(t) })
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			break
		}
		select {
		case <-d.done:
			t.Fatalf("sse-demo exited:\n%s", d.out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("sse-demo did not listen on %s:\n%s", addr, d.out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	m := embeddedRedis.FindStringSubmatch(d.out.String())
	if m == nil {
		t.Fatalf("sse-demo's banner does not name its embedded Redis:\n%s", d.out.String())
	}
	d.redis = m[1]
	return d
}

// stop stops the demo as Ctrl-C does and waits for it to exit.
func (d *demo) stop(t *testing.T) {
	select {
	case <-d.done:
		return
	default:
	}
	_ = d.cmd.Process.Signal(os.Interrupt)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.done
		t.Errorf("sse-demo did not stop within 10s of Ctrl-C:\n%s", d.out.String())
	}
}

// The demo page of cmd/sse-demo, run as a user runs it, in Chromium over
// HTTP/1.1: events published from the page and from Redis show in its log;
// when the server goes away the page shows "reconnecting", and once the
// demo is back it is "open" again and events flow.
func TestDemoPageInChromiumHTTP1(t *testing.T) {
	caddyproc.SkipShort(t)
	b := startBrowser(t)
	addr := fmt.Sprintf("127.0.0.1:%d", caddyproc.FreePort(t))
	d := startDemo(t, addr)

	if m := b.do(t, map[string]any{"cmd": "goto", "url": "http://" + addr + "/"}); m.Protocol != "http/1.1" {
		t.Fatalf("page loaded over %q, want http/1.1", m.Protocol)
	}
	b.waitState(t, "open", 15*time.Second)
	if p := b.do(t, map[string]any{"cmd": "eventsProtocol"}).Protocol; p != "http/1.1" {
		t.Fatalf("EventSource over %q, want http/1.1", p)
	}

	// From the page's own form (POST /publish/lobby, sse_publish).
	b.do(t, map[string]any{"cmd": "send", "text": "hello from chromium"})
	b.waitLog(t, "hello from chromium")
	// From a backend, with one Redis command.
	rdb := redis.NewClient(&redis.Options{Addr: d.redis})
	err := rdb.Publish(context.Background(), "room:lobby", `{"event":"chat","data":{"text":"from redis"}}`).Err()
	rdb.Close()
	if err != nil {
		t.Fatal(err)
	}
	b.waitLog(t, "from redis")
	if n := b.logCount(t, "[chat]"); n != 2 {
		t.Fatalf("%d chat events in the log, want 2", n)
	}

	// The server closes the stream (the demo stops) and comes back.
	d.stop(t)
	b.waitState(t, "reconnecting", 10*time.Second)
	startDemo(t, addr)
	b.waitState(t, "open", 15*time.Second)
	if st := b.states(t); !inOrder(st, "open", "reconnecting", "open") {
		t.Fatalf("states %q, want open, reconnecting, open", st)
	}
	b.do(t, map[string]any{"cmd": "send", "text": "after the restart"})
	b.waitLog(t, "after the restart")
}

// demoCaddyfileH2 is the demo's own Caddyfile (as `sse-demo
// -print-caddyfile` prints it) turned into an HTTPS site with `tls
// internal`, served by a real Caddy (cmd/caddy) that serves the demo page
// from cmd/sse-demo/static. Two options are added so that the test can see
// the page resume: `max_duration` makes the server close the stream every
// few seconds, and `history` makes events resumable.
func demoCaddyfileH2(t *testing.T, redisURL string) string {
	t.Helper()
	out, err := exec.Command(demoBinary(t), "-listen", "127.0.0.1:8080", "-redis", redisURL, "-print-caddyfile").Output()
	if err != nil {
		t.Fatalf("sse-demo -print-caddyfile: %v", err)
	}
	static, err := filepath.Abs(filepath.Join("..", "..", "cmd", "sse-demo", "static"))
	if err != nil {
		t.Fatal(err)
	}
	cf := string(out)
	for _, r := range [][2]string{
		{"admin off", "admin 127.0.0.1:{ADMIN}\n\tskip_install_trust\n\tlocal_certs\n\tdefault_bind 127.0.0.1"},
		{"auto_https off", "auto_https disable_redirects"},
		{"protocols h1\n", "protocols h1 h2\n"},
		{"\tfilesystem demo_page sse_demo_page\n", ""},
		{"http://:8080 {", "https://127.0.0.1:{HTTP} {\n\ttls internal"},
		{"retry 2s", "retry 2s\n\t\thistory 1000 10m\n\t\tmax_duration 4s"},
		{"max_size 4KiB", "max_size 4KiB\n\t\thistory 1000 10m"},
		{"file_server {\n\t\tfs demo_page\n\t}", "root * " + static + "\n\tfile_server"},
	} {
		if !strings.Contains(cf, r[0]) {
			t.Fatalf("the demo's Caddyfile no longer contains %q:\n%s", r[0], cf)
		}
		cf = strings.Replace(cf, r[0], r[1], 1)
	}
	return cf
}

// The same page over HTTP/2 and TLS (Caddy's internal CA, which Chromium is
// told to accept): events arrive; when the server closes the stream the
// page shows "reconnecting", and on reconnect it resumes: what was
// published while it was away arrives, once.
func TestDemoPageInChromiumHTTP2(t *testing.T) {
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	in := caddyproc.Start(t, demoCaddyfileH2(t, rs.URL()), nil)
	redistest.WaitLibrary(t, rs.Client(), "caddy_sse")
	b := startBrowser(t, "--ignore-certificate-errors")

	url := fmt.Sprintf("https://127.0.0.1:%d/", in.HTTPPort)
	if m := b.do(t, map[string]any{"cmd": "goto", "url": url}); m.Protocol != "h2" {
		t.Fatalf("page loaded over %q, want h2", m.Protocol)
	}
	b.waitState(t, "open", 15*time.Second)
	if p := b.do(t, map[string]any{"cmd": "eventsProtocol"}).Protocol; p != "h2" {
		t.Fatalf("EventSource over %q, want h2", p)
	}
	b.do(t, map[string]any{"cmd": "send", "text": "hello over h2"})
	b.waitLog(t, "hello over h2")

	// max_duration closes the stream within 4s; the page reconnects after
	// the 2s retry. Published in between, with one Redis command:
	b.waitState(t, "reconnecting", 10*time.Second)
	_, err := rs.Client().FCall(context.Background(), "sse_publish", []string{"room:lobby"},
		`{"event":"chat","data":{"text":"published while away"}}`).Result()
	if err != nil {
		t.Fatal(err)
	}
	b.waitState(t, "open", 10*time.Second)
	b.waitLog(t, "published while away")
	if st := b.states(t); !inOrder(st, "open", "reconnecting", "open") {
		t.Fatalf("states %q, want open, reconnecting, open", st)
	}
	b.do(t, map[string]any{"cmd": "send", "text": "after the resume"})
	b.waitLog(t, "after the resume")
	// Nothing twice: the resume replays only what the page missed.
	for _, text := range []string{"hello over h2", "published while away", "after the resume"} {
		if n := b.logCount(t, text); n != 1 {
			t.Fatalf("%q is %d times in the log, want once", text, n)
		}
	}
}

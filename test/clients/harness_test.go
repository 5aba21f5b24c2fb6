// Package clients checks caddy-sse against real SSE clients: the npm
// packages eventsource and @microsoft/fetch-event-source run by Node.js,
// headless Chromium on the demo page (driven by playwright-core), the
// browser helper client/caddy-sse.js in headless Chromium and Firefox and
// the admin live view in Chromium (driven by puppeteer-core), and a Go
// client. Each runs against a real Caddy built from cmd/caddy and a real
// redis-server. Install the npm packages first with `npm ci` in this folder.
package clients

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/internal/outbuf"
)

// msg is one JSON line printed by a node script; each script uses the
// fields it needs.
type msg struct {
	Kind        string  `json:"kind"`
	T           int64   `json:"t"` // milliseconds since the epoch
	N           int     `json:"n"`
	LastEventID *string `json:"lastEventId"`
	Method      string  `json:"method"`
	Type        string  `json:"type"`
	Data        string  `json:"data"`
	ID          string  `json:"id"`
	Retry       *int    `json:"retry"`
	ReadyState  int     `json:"readyState"`
	Code        *int    `json:"code"`
	Message     string  `json:"message"`
	Status      int     `json:"status"`
	ContentType string  `json:"contentType"`

	// Answers of browser.mjs.
	OK       bool     `json:"ok"`
	Error    string   `json:"error"`
	Protocol string   `json:"protocol"`
	State    string   `json:"state"`
	States   []string `json:"states"`
	Log      []string `json:"log"`

	// Answers of pages.mjs.
	Value      json.RawMessage `json:"value"`
	PageErrors []string        `json:"pageErrors"`
}

func (m msg) lastID() string {
	if m.LastEventID == nil {
		return ""
	}
	return *m.LastEventID
}

// node is a running node script.
type node struct {
	t      *testing.T
	name   string
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan msg
	stderr *outbuf.Buffer
	done   chan struct{}

	mu  sync.Mutex
	all []msg // every line so far
}

// requireNode fails the test, saying how to get them, when node or the npm
// packages are missing. These tests never skip (but under -short: see
// caddyproc.SkipShort).
func requireNode(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("node")
	if err != nil {
		t.Fatal("node not found on PATH: install Node.js 20 or later (for example `apt-get install -y nodejs npm`), then run `npm ci` in test/clients")
	}
	for _, pkg := range []string{"eventsource", "@microsoft/fetch-event-source", "playwright-core", "puppeteer-core"} {
		if _, err := os.Stat(filepath.Join("node_modules", pkg, "package.json")); err != nil {
			t.Fatalf("npm package %s is not installed: run `npm ci` in test/clients (from the repository root: `npm ci --prefix test/clients`)", pkg)
		}
	}
	return bin
}

// startNode runs `node script args...` in this folder. It is stopped (its
// standard input closed, then killed) at the end of the test.
func startNode(t *testing.T, script string, args ...string) *node {
	t.Helper()
	bin := requireNode(t)
	n := &node{
		t:      t,
		name:   script,
		cmd:    exec.Command(bin, append([]string{script}, args...)...),
		lines:  make(chan msg, 4096),
		stderr: &outbuf.Buffer{},
		done:   make(chan struct{}),
	}
	n.cmd.Stderr = n.stderr
	stdout, err := n.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if n.stdin, err = n.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := n.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(n.done)
		defer close(n.lines)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			var m msg
			if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
				m = msg{Kind: "garbage", Data: sc.Text()}
			}
			n.mu.Lock()
			n.all = append(n.all, m)
			n.mu.Unlock()
			n.lines <- m
		}
		_ = n.cmd.Wait()
	}()
	t.Cleanup(n.stop)
	return n
}

func (n *node) stop() {
	_ = n.stdin.Close()
	select {
	case <-n.done:
	case <-time.After(5 * time.Second):
		_ = n.cmd.Process.Kill()
		<-n.done
	}
}

// next returns the next line, failing the test after timeout.
func (n *node) next(timeout time.Duration) msg {
	n.t.Helper()
	select {
	case m, ok := <-n.lines:
		if !ok {
			n.t.Fatalf("%s exited: %s", n.name, n.stderr.String())
		}
		if m.Kind == "garbage" {
			n.t.Fatalf("%s printed %q", n.name, m.Data)
		}
		return m
	case <-time.After(timeout):
		n.t.Fatalf("%s printed nothing for %v; stderr:\n%s", n.name, timeout, n.stderr.String())
	}
	return msg{}
}

// until returns the lines up to and including the first of kind.
func (n *node) until(kind string, timeout time.Duration) []msg {
	n.t.Helper()
	deadline := time.Now().Add(timeout)
	var got []msg
	for {
		left := time.Until(deadline)
		if left <= 0 {
			n.t.Fatalf("%s: no %q within %v; got %+v\nstderr:\n%s", n.name, kind, timeout, got, n.stderr.String())
		}
		m := n.next(left)
		got = append(got, m)
		if m.Kind == kind {
			return got
		}
	}
}

// send writes one command line to the script's standard input.
func (n *node) send(v any) {
	n.t.Helper()
	b, _ := json.Marshal(v)
	if _, err := n.stdin.Write(append(b, '\n')); err != nil {
		n.t.Fatalf("writing to %s: %v", n.name, err)
	}
}

// publishTicks publishes n resumable envelopes {"event":"tick","data":"<i>"}
// on channel, one every interval, and reports the ids on the returned
// channel (closed at the end, or at the first error, which it sends as
// "error: ...").
func publishTicks(rdb *redis.Client, channel string, n int, interval time.Duration) <-chan string {
	ids := make(chan string, n+1)
	go func() {
		defer close(ids)
		for i := 1; i <= n; i++ {
			payload := fmt.Sprintf(`{"event":"tick","data":"%d"}`, i)
			id, err := rdb.FCall(context.Background(), "sse_publish", []string{channel}, payload).Result()
			if err != nil {
				ids <- "error: " + err.Error()
				return
			}
			ids <- fmt.Sprint(id)
			time.Sleep(interval)
		}
	}()
	return ids
}

// collectIDs drains ids, failing on a publishing error.
func collectIDs(t *testing.T, ids <-chan string) []string {
	t.Helper()
	var out []string
	for id := range ids {
		if strings.HasPrefix(id, "error: ") {
			t.Fatal(id)
		}
		out = append(out, id)
	}
	return out
}

package clients

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The browsers pages.mjs drives: Debian's Chromium and Firefox ESR.
var browserPaths = map[string]struct{ path, install string }{
	"chromium": {"/usr/bin/chromium", "apt-get install -y chromium"},
	"firefox":  {"/usr/bin/firefox-esr", "apt-get install -y firefox-esr"},
}

// pages is one page in a headless browser, driven by pages.mjs.
type pages struct {
	n     *node
	which string
}

// startPages launches which ("chromium" or "firefox") with one page. It
// fails the test, with the command that installs it, when the browser is
// missing.
func startPages(t *testing.T, which string) *pages {
	t.Helper()
	requireNode(t)
	b := browserPaths[which]
	if _, err := os.Stat(b.path); err != nil {
		t.Fatalf("%s not found: install it with `%s`", b.path, b.install)
	}
	n := startNode(t, "pages.mjs", which)
	if m := n.next(120 * time.Second); m.Kind != "ready" {
		t.Fatalf("pages.mjs %s: %+v\n%s", which, m, n.stderr.String())
	}
	return &pages{n: n, which: which}
}

// do sends a command and returns its answer. A failed command, or an
// error in the page, fails the test (with a screenshot of the page).
func (p *pages) do(t *testing.T, cmd map[string]any) msg {
	t.Helper()
	p.n.send(cmd)
	m := p.n.next(90 * time.Second)
	if m.Kind != "reply" || !m.OK || len(m.PageErrors) > 0 {
		shot := filepath.Join(t.TempDir(), p.which+".png")
		p.n.send(map[string]any{"cmd": "screenshot", "path": shot})
		p.n.next(30 * time.Second)
		t.Fatalf("%s: %v: %+v\npage errors: %q\n(screenshot %s)\n%s", p.which, cmd, m, m.PageErrors, shot, p.n.stderr.String())
	}
	return m
}

func (p *pages) goTo(t *testing.T, url string) int {
	t.Helper()
	return p.do(t, map[string]any{"cmd": "goto", "url": url}).Status
}

// call runs window[fn](args...) in the page and decodes what it returned
// into out (when out is not nil).
func (p *pages) call(t *testing.T, out any, fn string, args ...any) {
	t.Helper()
	if args == nil {
		args = []any{}
	}
	m := p.do(t, map[string]any{"cmd": "call", "fn": fn, "args": args})
	if out != nil {
		if err := json.Unmarshal(m.Value, out); err != nil {
			t.Fatalf("%s: %s(%v) returned %s: %v", p.which, fn, args, m.Value, err)
		}
	}
}

// eval evaluates a JavaScript expression in the page into out.
func (p *pages) eval(t *testing.T, out any, expr string) {
	t.Helper()
	m := p.do(t, map[string]any{"cmd": "eval", "expr": expr})
	if err := json.Unmarshal(m.Value, out); err != nil {
		t.Fatalf("%s: %s returned %s: %v", p.which, expr, m.Value, err)
	}
}

// wait waits until a JavaScript expression is truthy in the page.
func (p *pages) wait(t *testing.T, expr string, timeout time.Duration) {
	t.Helper()
	p.n.send(map[string]any{"cmd": "wait", "expr": expr, "timeoutMs": timeout.Milliseconds()})
	m := p.n.next(timeout + 30*time.Second)
	if m.Kind != "reply" || !m.OK || len(m.PageErrors) > 0 {
		t.Fatalf("%s: waiting for %s: %+v\npage errors: %q", p.which, expr, m, m.PageErrors)
	}
}

func (p *pages) screenshot(t *testing.T, path string) {
	t.Helper()
	p.do(t, map[string]any{"cmd": "screenshot", "path": path})
}

// accessLog is one line of Caddy's JSON access log.
type accessLog struct {
	Logger  string `json:"logger"`
	Status  int    `json:"status"`
	Request struct {
		Method  string              `json:"method"`
		URI     string              `json:"uri"`
		Headers map[string][]string `json:"headers"`
	} `json:"request"`
}

// requests returns the access log's lines for the requests whose path is
// path, in the order Caddy logged them (when each ended).
func requests(logs, path string) []accessLog {
	var out []accessLog
	for _, line := range strings.Split(logs, "\n") {
		if !strings.Contains(line, `"http.log.access`) {
			continue
		}
		var l accessLog
		if json.Unmarshal([]byte(line), &l) != nil {
			continue
		}
		p, _, _ := strings.Cut(l.Request.URI, "?")
		if p == path {
			out = append(out, l)
		}
	}
	return out
}

package caddysse_test

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
)

var liveCaddyfile = globalOptions + `
http://127.0.0.1:{HTTP} {
	sse /a/* {
		redis {REDIS}
		channel room:{path.1}
	}
}
`

type liveJSON struct {
	Now        int64              `json:"now"`
	IntervalMS int64              `json:"interval_ms"`
	Streams    int64              `json:"streams"`
	Channels   int                `json:"channels"`
	Hubs       int                `json:"hubs"`
	Totals     map[string]float64 `json:"totals"`
	Closed     map[string]float64 `json:"streams_closed"`
	Redis      []struct {
		Redis struct {
			Mode  string   `json:"mode"`
			Addrs []string `json:"addrs"`
		} `json:"redis"`
		Connected bool `json:"connected"`
		Channels  int  `json:"channels"`
	} `json:"redis"`
	Series []struct {
		T         int64   `json:"t"`
		Streams   int64   `json:"streams"`
		Received  float64 `json:"received"`
		Delivered float64 `json:"delivered"`
	} `json:"series"`
}

func getLive(t *testing.T, in *caddyproc.Instance, query string) (liveJSON, string) {
	t.Helper()
	code, hdr, body := adminGet(t, in, "/sse/live.json"+query)
	if code != http.StatusOK || !strings.HasPrefix(hdr.Get("Content-Type"), "application/json") {
		t.Fatalf("GET /sse/live.json%s: %d %q %s", query, code, hdr.Get("Content-Type"), body)
	}
	var l liveJSON
	if err := json.Unmarshal([]byte(body), &l); err != nil {
		t.Fatalf("GET /sse/live.json is not JSON: %v\n%s", err, body)
	}
	return l, body
}

// cspSources returns the sources a Content-Security-Policy gives directive.
func cspSources(csp, directive string) []string {
	for _, d := range strings.Split(csp, ";") {
		f := strings.Fields(d)
		if len(f) > 0 && f[0] == directive {
			return f[1:]
		}
	}
	return nil
}

// The live view's page: one file, nothing external, its inline script and
// style allowed by hash and nothing else.
func TestAdminLivePage(t *testing.T) {
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	in := caddyproc.Start(t, liveCaddyfile, caddyproc.Options{"{REDIS}": rs.URL()})
	code, hdr, body := adminGet(t, in, "/sse/live")
	if code != http.StatusOK || hdr.Get("Content-Type") != "text/html; charset=utf-8" {
		t.Fatalf("GET /sse/live: %d %q", code, hdr.Get("Content-Type"))
	}
	csp := hdr.Get("Content-Security-Policy")
	hashOf := func(re string) string {
		m := regexp.MustCompile(re).FindAllStringSubmatch(body, -1)
		if len(m) != 1 {
			t.Fatalf("the page has %d matches of %s, want one", len(m), re)
		}
		sum := sha256.Sum256([]byte(m[0][1]))
		return "'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"
	}
	for directive, want := range map[string][]string{
		"default-src":     {"'none'"},
		"script-src":      {hashOf(`(?s)<script>(.*?)</script>`)},
		"style-src":       {hashOf(`(?s)<style>(.*?)</style>`)},
		"connect-src":     {"'self'"},
		"frame-ancestors": {"'none'"},
		"base-uri":        {"'none'"},
		"form-action":     {"'none'"},
	} {
		if got := cspSources(csp, directive); strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("Content-Security-Policy %s %q, want %q (all: %s)", directive, got, want, csp)
		}
	}
	for h, want := range map[string]string{
		"X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
		"Referrer-Policy": "same-origin", "Cache-Control": "no-store",
	} {
		if got := hdr.Get(h); got != want {
			t.Errorf("%s: %q, want %q", h, got, want)
		}
	}
	// Nothing external: no src, no stylesheet, no url() (the SVG namespace
	// is a name, not a request).
	if m := regexp.MustCompile(`(?i)\ssrc=|url\(|@import|<link(?:[^>]*)href="(?:[^d]|d[^a])`).FindString(body); m != "" {
		t.Fatalf("the page loads something (%q)", m)
	}

	// Read-only.
	resp, err := http.Post(in.AdminURL()+"/sse/live", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("POST /sse/live: %d, want 405", resp.StatusCode)
	}

	// Why the README passes the page through a site: Caddy's admin
	// endpoint refuses a browser's own navigation (Sec-Fetch-* headers and
	// neither Origin nor Referer), and accepts it with its own origin, as
	// the README's reverse_proxy sends.
	navigate := func(origin string) int {
		req, _ := http.NewRequest(http.MethodGet, in.AdminURL()+"/sse/live", nil)
		req.Header.Set("Sec-Fetch-Mode", "navigate")
		req.Header.Set("Sec-Fetch-Site", "none")
		if origin != "" {
			req.Header.Set("Origin", origin)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := navigate(""); code != http.StatusForbidden {
		t.Errorf("a browser's navigation to the admin endpoint: %d; the README says 403", code)
	}
	if code := navigate(in.AdminURL()); code != http.StatusOK {
		t.Errorf("with the admin endpoint's own Origin: %d, want 200", code)
	}
}

// GET /sse/live.json: the counters move as events flow, the series has
// rates, Redis is described without credentials.
func TestAdminLiveJSON(t *testing.T) {
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	ctx := context.Background()
	url := rs.AddUser(t, adminTestUser, adminTestPassword, "~*", "&*", "+@all")
	in := caddyproc.Start(t, liveCaddyfile, caddyproc.Options{"{REDIS}": url})

	before, _ := getLive(t, in, "")
	if before.IntervalMS != 1000 || before.Streams != 0 {
		t.Fatalf("before any stream: %+v", before)
	}
	var streams []*sseclient.Stream
	for range 2 {
		s, err := sseclient.Get(ctx, in.URL()+"/a/lobby")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(s.Close)
		streams = append(streams, s)
	}
	pub := redis.NewClient(&redis.Options{Addr: rs.Addr(), Username: adminTestUser, Password: adminTestPassword})
	defer pub.Close()
	const n = 10
	for i := range n {
		if err := pub.Publish(ctx, "room:lobby", fmt.Sprint(i)).Err(); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range streams {
		for i := range n {
			if ev, err := s.Next(5 * time.Second); err != nil || ev.Data != fmt.Sprint(i) {
				t.Fatalf("event %d: %+v, %v", i, ev, err)
			}
		}
	}

	// Within two samples the series shows the events as rates.
	var l liveJSON
	var body string
	deadline := time.Now().Add(5 * time.Second)
	for {
		l, body = getLive(t, in, "")
		var in, out float64
		for _, s := range l.Series {
			in += s.Received
			out += s.Delivered
		}
		// Rates over intervals of about a second add up to about the count.
		if in >= n*0.8 && out >= 2*n*0.8 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the series does not show %d events in and %d out (%v, %v):\n%s", n, 2*n, in, out, body)
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, secret := range []string{adminTestPassword, adminTestUser, url} {
		if strings.Contains(body, secret) {
			t.Fatalf("GET /sse/live.json shows the Redis credentials (%q):\n%s", secret, body)
		}
	}
	if got := l.Totals["delivered"] - before.Totals["delivered"]; got != 2*n {
		t.Errorf("delivered went up by %v, want %d", got, 2*n)
	}
	if got := l.Totals["received"] - before.Totals["received"]; got != n {
		t.Errorf("received went up by %v, want %d", got, n)
	}
	if l.Streams != 2 || l.Channels != 1 || l.Hubs != 1 || len(l.Redis) != 1 ||
		!l.Redis[0].Connected || l.Redis[0].Channels != 1 || l.Redis[0].Redis.Mode != "single" ||
		len(l.Redis[0].Redis.Addrs) != 1 || l.Redis[0].Redis.Addrs[0] != rs.Addr() {
		t.Fatalf("streams, channels, Redis:\n%s", body)
	}
	last := l.Series[len(l.Series)-1]
	if last.Streams != 2 {
		t.Errorf("the newest sample has %d streams, want 2", last.Streams)
	}

	// ?since= answers only newer samples.
	newer, _ := getLive(t, in, fmt.Sprintf("?since=%d", last.T))
	for _, s := range newer.Series {
		if s.T <= last.T {
			t.Fatalf("?since=%d answered a sample of %d", last.T, s.T)
		}
	}
	if code, _, _ := adminGet(t, in, "/sse/live.json?since=yesterday"); code != http.StatusBadRequest {
		t.Fatalf("?since=yesterday: %d, want 400", code)
	}

	// A stream that ends is counted by reason.
	streams[0].Close()
	deadline = time.Now().Add(5 * time.Second)
	for {
		l, body = getLive(t, in, "")
		if l.Streams == 1 && l.Closed["client"]-before.Closed["client"] == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after a client left, want 1 stream and one more closed by the client:\n%s", body)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

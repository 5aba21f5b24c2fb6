package legacyapp

import (
	"compress/gzip"
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-sse/caddy-sse/examples/internal/exampletest"
	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

// legacyApp stands for the existing app: a page, a form, a 404, and a
// counter of requests that reached it on /events (there must be none).
func legacyApp(t *testing.T) (*httptest.Server, *atomic.Int64) {
	var eventsHits atomic.Int64
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		io.WriteString(w, "<h1>Legacy app</h1>")
	})
	mux.HandleFunc("POST /login", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("Set-Cookie", "session=abc")
		io.WriteString(w, "welcome "+string(body))
	})
	mux.HandleFunc("/events", func(w http.ResponseWriter, r *http.Request) {
		eventsHits.Add(1)
		http.Error(w, "the app has no /events", http.StatusTeapot)
	})
	app := httptest.NewServer(mux)
	t.Cleanup(app.Close)
	return app, &eventsHits
}

func TestLegacyAppExample(t *testing.T) {
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	app, eventsHits := legacyApp(t)
	cf := exampletest.Caddyfile(t, "Caddyfile",
		"http://localhost:8000", "http://127.0.0.1:{HTTP}",
		"redis://127.0.0.1:6379", rs.URL(),
		"reverse_proxy 127.0.0.1:8080", "reverse_proxy "+app.Listener.Addr().String(),
	)
	in := caddyproc.Start(t, cf, nil)
	redistest.WaitLibrary(t, rs.Client(), "caddy_sse")

	// The app's pages and forms pass through untouched.
	resp, err := http.Get(in.URL() + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "<h1>Legacy app</h1>" {
		t.Fatalf("GET / = %d %q, want the app's page", resp.StatusCode, body)
	}
	resp, err = http.Post(in.URL()+"/login", "application/x-www-form-urlencoded", strings.NewReader("user=ada"))
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "welcome user=ada" || resp.Header.Get("Set-Cookie") != "session=abc" {
		t.Fatalf("POST /login = %d %q %v", resp.StatusCode, body, resp.Header)
	}
	resp, err = http.Get(in.URL() + "/nope")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 404 {
		t.Fatalf("GET /nope = %d, want the app's 404", resp.StatusCode)
	}

	// A browser's stream: it asks for gzip, as browsers do, and gets every
	// event the moment it is published.
	s := openGzip(t, in.URL()+"/events")
	if ct := s.Resp.Header.Get("Content-Type"); ct != "text/event-stream; charset=utf-8" {
		t.Fatalf("Content-Type = %q", ct)
	}
	// Over HTTP/1.1 the module takes the connection over and writes the
	// stream itself, uncompressed (takeover); with `takeover off` or over
	// HTTP/2 it goes through encode, gzipped. Either way the client must
	// get each event at once.
	switch ce := s.Resp.Header.Get("Content-Encoding"); ce {
	case "", "gzip":
		t.Logf("stream Content-Encoding: %q", ce)
	default:
		t.Fatalf("Content-Encoding = %q, want gzip or none", ce)
	}
	var lastID string
	for _, msg := range []string{"Maintenance at 22:00", "Coffee is ready", "two\nlines"} {
		lastID = ssetest.PublishResumable(t, rs.Client(), "announcements", msg)
		// Each event arrives before the next is published: nothing on the
		// way (encode included) holds it back.
		ev, err := s.Next(3 * time.Second)
		if err != nil {
			t.Fatalf("event %q did not arrive through encode: %v (got %q)", msg, err, s.Raw())
		}
		if ev.Data != msg || ev.ID != lastID || ev.Event != "message" {
			t.Fatalf("got %+v, want data %q id %s", ev, msg, lastID)
		}
	}
	if !strings.HasPrefix(s.Raw(), ":\nretry: 3000\n") {
		t.Fatalf("stream starts with %q, want the comment and retry: 3000", s.Raw())
	}
	// Fire-and-forget events arrive too (without an id).
	if n := ssetest.Publish(t, rs.Client(), "announcements", "plain"); n != 1 {
		t.Fatalf("PUBLISH reached %d subscriptions, want 1", n)
	}
	ssetest.Expect(t, s, "plain")
	s.Close()

	// The browser reconnects with Last-Event-ID and gets what it missed.
	missed := ssetest.PublishResumable(t, rs.Client(), "announcements", "while you were away")
	s2 := ssetest.Open(t, in.URL()+"/events", "Last-Event-ID", lastID)
	if ev := ssetest.Next(t, s2); ev.Data != "while you were away" || ev.ID != missed {
		t.Fatalf("resumed stream got %+v, want the missed event %s", ev, missed)
	}
	ssetest.NoEvent(t, s2, 200*time.Millisecond)

	// sse answers /events itself: wrong methods get 405, and nothing of it
	// reaches the app.
	req, _ := http.NewRequest(http.MethodPut, in.URL()+"/events", nil)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed || resp.Header.Get("Allow") != "GET, POST" {
		t.Fatalf("PUT /events = %d Allow %q", resp.StatusCode, resp.Header.Get("Allow"))
	}
	if n := eventsHits.Load(); n != 0 {
		t.Fatalf("%d requests to /events reached the app", n)
	}
}

// openGzip opens a stream asking for gzip and reads it through a gzip
// reader, as a browser does.
func openGzip(t *testing.T, url string) *sseclient.Stream {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header.Set("Accept-Encoding", "gzip")
	tr := &gunzipTransport{base: &http.Transport{DialContext: (&net.Dialer{}).DialContext}}
	s, err := sseclient.Open(context.Background(), &http.Client{Transport: tr}, req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// gunzipTransport decompresses gzip bodies as they stream in, keeping the
// Content-Encoding header for the test to see.
type gunzipTransport struct{ base http.RoundTripper }

func (g *gunzipTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := g.base.RoundTrip(req)
	if err != nil || resp.Header.Get("Content-Encoding") != "gzip" {
		return resp, err
	}
	resp.Body = &gzipBody{raw: resp.Body}
	return resp, nil
}

// gzipBody opens the gzip reader on first read: its header arrives with the
// first flush, not with the response headers.
type gzipBody struct {
	raw io.ReadCloser
	zr  *gzip.Reader
}

func (b *gzipBody) Read(p []byte) (int, error) {
	if b.zr == nil {
		zr, err := gzip.NewReader(b.raw)
		if err != nil {
			return 0, err
		}
		b.zr = zr
	}
	return b.zr.Read(p)
}

func (b *gzipBody) Close() error { return b.raw.Close() }

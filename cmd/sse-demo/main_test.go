package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig"

	"github.com/caddy-sse/caddy-sse/internal/sseclient"
)

// eventTimeout bounds every wait for an event.
const eventTimeout = 5 * time.Second

// freeListen returns a loopback host:port that was free a moment ago.
func freeListen(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return "127.0.0.1:" + strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
}

var client = &http.Client{Timeout: 5 * time.Second}

func TestDemo(t *testing.T) {
	listen := freeListen(t)
	var banner strings.Builder
	d, err := start(options{Listen: listen, Out: &banner})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.stop(); err != nil {
			t.Error(err)
		}
	})
	base := "http://" + listen

	for _, want := range []string{
		"Open:      " + base + "/",
		"redis-cli -p " + d.redis.Port() + " PUBLISH room:lobby ",
	} {
		if !strings.Contains(banner.String(), want) {
			t.Errorf("banner lacks %q:\n%s", want, banner.String())
		}
	}

	t.Run("page", func(t *testing.T) {
		resp, err := client.Get(base + "/")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET /: status %d: %s", resp.StatusCode, body)
		}
		if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/html") {
			t.Errorf("GET /: Content-Type %q, want text/html", ct)
		}
		for _, want := range []string{"<title>caddy-sse demo</title>", "new EventSource(", `"/publish/"`} {
			if !strings.Contains(string(body), want) {
				t.Errorf("GET /: page lacks %q", want)
			}
		}
	})

	t.Run("publish over HTTP", func(t *testing.T) {
		st := openStream(t, base+"/events/lobby")
		resp, err := client.Post(base+"/publish/lobby", "application/json",
			strings.NewReader(`{"event":"chat","data":{"text":"hello from the test"}}`))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("POST /publish/lobby: status %d: %s", resp.StatusCode, body)
		}
		expectEvent(t, st, "chat", `{"text":"hello from the test"}`)
	})

	t.Run("publish in Redis", func(t *testing.T) {
		// What the banner's redis-cli line does.
		st := openStream(t, base+"/events/lobby")
		if n := d.redis.Publish("room:lobby", `{"event":"chat","data":"from redis"}`); n != 1 {
			t.Fatalf("PUBLISH reached %d subscribers, want 1 (the instance's one connection)", n)
		}
		expectEvent(t, st, "chat", "from redis")
	})

	t.Run("rooms are separate", func(t *testing.T) {
		other := openStream(t, base+"/events/other")
		lobby := openStream(t, base+"/events/lobby")
		d.redis.Publish("room:lobby", `{"event":"chat","data":"lobby only"}`)
		d.redis.Publish("room:other", `{"event":"chat","data":"other only"}`)
		expectEvent(t, lobby, "chat", "lobby only")
		expectEvent(t, other, "chat", "other only")
	})

	t.Run("refusals", func(t *testing.T) {
		for _, c := range []struct {
			method, path string
			want         int
		}{
			{"GET", "/events/bad.room", http.StatusForbidden},
			{"GET", "/events/" + strings.Repeat("x", 65), http.StatusForbidden},
			{"GET", "/events/", http.StatusBadRequest},
			{"GET", "/publish/lobby", http.StatusMethodNotAllowed},
			{"POST", "/publish/bad.room", http.StatusNotFound},
		} {
			req, err := http.NewRequest(c.method, base+c.path, strings.NewReader(""))
			if err != nil {
				t.Fatal(err)
			}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != c.want {
				t.Errorf("%s %s: status %d, want %d", c.method, c.path, resp.StatusCode, c.want)
			}
		}
	})
}

// openStream opens an event stream, closed when the test ends.
func openStream(t *testing.T, url string) *sseclient.Stream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	st, err := sseclient.Get(ctx, url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	t.Cleanup(st.Close)
	if ct := st.Resp.Header.Get("Content-Type"); ct != "text/event-stream; charset=utf-8" {
		t.Errorf("GET %s: Content-Type %q", url, ct)
	}
	return st
}

func expectEvent(t *testing.T, st *sseclient.Stream, event, data string) {
	t.Helper()
	ev, err := st.Next(eventTimeout)
	if err != nil {
		t.Fatalf("waiting for %s event %q: %v (stream so far: %q)", event, data, err, st.Raw())
	}
	if ev.Event != event || ev.Data != data {
		t.Fatalf("got %s event %q, want %s event %q", ev.Event, ev.Data, event, data)
	}
}

// TestRunStops checks that run serves until its context ends, then stops
// Caddy and frees the port, ending open streams.
func TestRunStops(t *testing.T) {
	listen := freeListen(t)
	base := "http://" + listen
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- run(ctx, options{Listen: listen}) }()

	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := client.Get(base + "/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the demo did not answer GET / in time: %v", err)
		}
		select {
		case err := <-done:
			t.Fatalf("run returned early: %v", err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	st := openStream(t, base+"/events/lobby")

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return after its context ended")
	}
	select {
	case <-st.Done():
	case <-time.After(5 * time.Second):
		t.Error("an open stream did not end when the demo stopped")
	}
	if c, err := net.DialTimeout("tcp", listen, time.Second); err == nil {
		c.Close()
		t.Errorf("%s still accepts connections after run returned", listen)
	}
}

func TestCaddyfileFor(t *testing.T) {
	cf, err := caddyfileFor("127.0.0.1:8080", "redis://127.0.0.1:6379", false)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"http://:8080 {", "bind 127.0.0.1", "redis redis://127.0.0.1:6379", "level WARN"} {
		if !strings.Contains(cf, want) {
			t.Errorf("Caddyfile lacks %q:\n%s", want, cf)
		}
	}
	if cf, err := caddyfileFor(":8080", "redis://127.0.0.1:6379", true); err != nil {
		t.Error(err)
	} else if strings.Contains(cf, "bind") || !strings.Contains(cf, "level INFO") {
		t.Errorf("-listen :8080 -v: want no bind and INFO:\n%s", cf)
	}

	// Caddy warns about a Caddyfile `caddy fmt` would change, for example a
	// blank line the template leaves behind.
	for _, listen := range []string{"127.0.0.1:8080", ":8080"} {
		cf, err := caddyfileFor(listen, "redis://127.0.0.1:6379", false)
		if err != nil {
			t.Fatal(err)
		}
		_, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cf), map[string]any{"filename": "Caddyfile"})
		if err != nil {
			t.Fatalf("-listen %s: %v", listen, err)
		}
		for _, w := range warnings {
			t.Errorf("-listen %s: Caddyfile:%d: %s", listen, w.Line, w.Message)
		}
	}

	for _, c := range []struct{ listen, redis string }{
		{"8080", "redis://127.0.0.1:6379"},
		{"127.0.0.1:http", "redis://127.0.0.1:6379"},
		{"127.0.0.1:0", "redis://127.0.0.1:6379"},
		{"127.0.0.1:8080", "http://127.0.0.1:6379"},
		{"127.0.0.1:8080", "redis://127.0.0.1:6379 {"},
		{"127.0.0.1:8080", "redis://:pass\"word@127.0.0.1:6379"},
	} {
		_, err := caddyfileFor(c.listen, c.redis, false)
		if err == nil {
			t.Errorf("caddyfileFor(%q, %q): no error", c.listen, c.redis)
			continue
		}
		if strings.Contains(err.Error(), "pass") {
			t.Errorf("caddyfileFor error repeats the password: %v", err)
		}
	}
}

package twoinstances

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/caddy-sse/caddy-sse/examples/internal/exampletest"
	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

// instanceCaddyfile is the shipped Caddyfile with the test's addresses.
func instanceCaddyfile(t *testing.T, redisURL, app string) string {
	return exampletest.Caddyfile(t, "Caddyfile",
		"localhost:{$ADMIN_PORT:2019}", "127.0.0.1:{ADMIN}",
		"http://:{$PORT:8001}", "http://:{HTTP}",
		"redis://127.0.0.1:6379", redisURL,
		"reverse_proxy 127.0.0.1:8080", "reverse_proxy "+app,
	)
}

// openStreams asks an instance's admin API how many streams it holds.
func openStreams(t *testing.T, in *caddyproc.Instance) int {
	t.Helper()
	resp, err := http.Get(in.AdminURL() + "/sse/stats")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st struct{ Streams int }
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
	return st.Streams
}

func TestTwoInstancesExample(t *testing.T) {
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	rdb := rs.Client()
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "app")
	}))
	t.Cleanup(app.Close)
	appAddr := app.Listener.Addr().String()

	a := caddyproc.Start(t, instanceCaddyfile(t, rs.URL(), appAddr), nil)
	b := caddyproc.Start(t, instanceCaddyfile(t, rs.URL(), appAddr), nil)
	lb := caddyproc.Start(t, exampletest.Caddyfile(t, "lb.Caddyfile",
		"localhost:{$ADMIN_PORT:2021}", "127.0.0.1:{ADMIN}",
		"http://localhost:8000", "http://127.0.0.1:{HTTP}",
		"127.0.0.1:8001 127.0.0.1:8002", a.Addr()+" "+b.Addr(),
	), nil)
	redistest.WaitLibrary(t, rdb, "caddy_sse")

	// One stream on each instance, directly.
	onA := ssetest.Open(t, a.URL()+"/events/42")
	onB := ssetest.Open(t, b.URL()+"/events/42")
	if n := ssetest.Publish(t, rdb, "user:42", "published once"); n != 2 {
		t.Fatalf("PUBLISH reached %d subscriptions, want 2 (one per instance)", n)
	}
	ssetest.Expect(t, onA, "published once")
	ssetest.Expect(t, onB, "published once")
	onA.Close()
	onB.Close()

	// Through the balancer: round robin puts one stream on each instance,
	// and one PUBLISH still reaches both.
	via1 := ssetest.Open(t, lb.URL()+"/events/7")
	via2 := ssetest.Open(t, lb.URL()+"/events/7")
	deadline := time.Now().Add(5 * time.Second)
	for openStreams(t, a) != 1 || openStreams(t, b) != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("through the balancer: %d streams on A, %d on B; want 1 and 1", openStreams(t, a), openStreams(t, b))
		}
		time.Sleep(50 * time.Millisecond)
	}
	id := ssetest.PublishResumable(t, rdb, "user:7", "through the balancer")
	if ev := ssetest.Next(t, via1); ev.Data != "through the balancer" || ev.ID != id {
		t.Fatalf("first stream through the balancer got %+v", ev)
	}
	if ev := ssetest.Next(t, via2); ev.Data != "through the balancer" || ev.ID != id {
		t.Fatalf("second stream through the balancer got %+v", ev)
	}
	// The balancer passes the stream's headers and flushes the opening
	// comment at once.
	if ct := via1.Resp.Header.Get("Content-Type"); ct != "text/event-stream; charset=utf-8" {
		t.Fatalf("through the balancer: Content-Type %q", ct)
	}

	// A browser on A goes away after event 1; two events are published
	// meanwhile; it comes back on B with Last-Event-ID and gets exactly
	// those, then the live ones.
	s := ssetest.Open(t, a.URL()+"/events/9")
	first := ssetest.PublishResumable(t, rdb, "user:9", "1")
	if ev := ssetest.Next(t, s); ev.ID != first {
		t.Fatalf("got %+v", ev)
	}
	s.Close()
	var missed []string
	for i := 2; i <= 3; i++ {
		missed = append(missed, ssetest.PublishResumable(t, rdb, "user:9", fmt.Sprint(i)))
	}
	s = ssetest.Open(t, b.URL()+"/events/9", "Last-Event-ID", first)
	live := make(chan string, 1)
	go func() {
		// Published while the replay is being written, or just after: it
		// must come once, after the missed ones.
		id, err := rdb.FCall(context.Background(), "sse_publish", []string{"user:9"}, "4").Result()
		if err != nil {
			live <- "error: " + err.Error()
			return
		}
		live <- fmt.Sprint(id)
	}()
	for i, want := range []string{"2", "3", "4"} {
		ev := ssetest.Next(t, s)
		if ev.Data != want {
			t.Fatalf("resumed on B: event %d is %+v, want data %s", i, ev, want)
		}
		if i < 2 && ev.ID != missed[i] {
			t.Fatalf("resumed on B: event %d has id %s, want %s", i, ev.ID, missed[i])
		}
		if i == 2 {
			if want := <-live; ev.ID != want {
				t.Fatalf("resumed on B: live event has id %s, want %s", ev.ID, want)
			}
		}
	}
	ssetest.NoEvent(t, s, 200*time.Millisecond)
}

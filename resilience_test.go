package caddysse_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

// Events are flushed one by one through encode (gzip) and over HTTP/2.
func TestHTTP2AndEncode(t *testing.T) {
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	cf := `{
	admin 127.0.0.1:{ADMIN}
	skip_install_trust
	persist_config off
	local_certs
	default_bind 127.0.0.1
	default_sni 127.0.0.1
	storage file_system {STORAGE}
}

https://127.0.0.1:{HTTP} {
	tls internal
	encode gzip
	sse /events/* {
		redis {REDIS}
		channel {path.1}
	}
}
`
	in := caddyproc.Start(t, cf, caddyproc.Options{"{REDIS}": rs.URL(), "{STORAGE}": t.TempDir()})
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true}, // Caddy's internal CA
		ForceAttemptHTTP2: true,
	}}
	// The internal certificate is issued in the background at start.
	var s *sseclient.Stream
	var err error
	for deadline := time.Now().Add(15 * time.Second); ; {
		req, _ := http.NewRequest(http.MethodGet, "https://"+in.Addr()+"/events/h2", nil)
		if s, err = sseclient.Open(context.Background(), client, req); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	defer s.Close()
	if s.Resp.ProtoMajor != 2 {
		t.Fatalf("protocol %s, want HTTP/2", s.Resp.Proto)
	}
	if !s.Resp.Uncompressed {
		t.Fatal("the stream was not gzip-encoded: encode did not wrap it")
	}
	rdb := rs.Client()
	for i := 0; i < 5; i++ {
		rdb.Publish(context.Background(), "h2", fmt.Sprint("event ", i))
		// Each event arrives before the next is published: flushed through
		// the gzip writer and the HTTP/2 framer.
		if ev := ssetest.Next(t, s); ev.Data != fmt.Sprint("event ", i) {
			t.Fatalf("got %+v", ev)
		}
	}
}

// Over HTTP/1.1 with encode in front, a stream that would be taken over
// streams through the encoder instead once it has taken the response: the
// client gets a gzip stream whose events arrive one by one, never raw bytes
// under a gzip header.
func TestHTTP1EncodeWithTakeover(t *testing.T) {
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	in := caddyproc.Start(t, globalOptions+`
http://127.0.0.1:{HTTP} {
	encode gzip
	sse /events/* {
		redis {REDIS}
		channel {path.1}
	}
}
`, caddyproc.Options{"{REDIS}": rs.URL()})
	s := ssetest.Open(t, in.URL()+"/events/h1gz")
	if !s.Resp.Uncompressed {
		t.Fatal("the stream was not gzip-encoded: encode did not wrap it")
	}
	ssetest.WaitNumsub(t, rs.Client(), "h1gz", 1, 5*time.Second)
	for i := 0; i < 5; i++ {
		rs.Client().Publish(context.Background(), "h1gz", fmt.Sprint("event ", i))
		if ev := ssetest.Next(t, s); ev.Data != fmt.Sprint("event ", i) {
			t.Fatalf("got %+v", ev)
		}
	}
}

var outageCaddyfile = globalOptions + `
http://127.0.0.1:{HTTP} {
	sse /events/* {
		redis {REDIS}
		channel {path.1}
		keepalive 200ms
	}
	sse /resumable/* {
		redis {REDIS}
		channel r:{path.1}
		history 10000
	}
	sse /short/* {
		redis {REDIS}
		channel {path.1}
		max_duration 1s
		history 10000
	}
}
`

func TestRedisOutageKeepsStreamsOpen(t *testing.T) {
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	in := caddyproc.Start(t, outageCaddyfile, caddyproc.Options{"{REDIS}": rs.URL()})
	const streams = 50
	var all []*sseclient.Stream
	for i := 0; i < streams; i++ {
		all = append(all, ssetest.Open(t, in.URL()+fmt.Sprintf("/events/c%d", i%5)))
	}
	ssetest.WaitNumsub(t, rs.Client(), "c0", 1, 5*time.Second)

	rs.Stop()
	waitMetrics(t, in, "caddy_sse_redis_connected 0")
	// Streams stay open with keepalives, and new ones are accepted.
	before := all[0].Comments()
	time.Sleep(600 * time.Millisecond)
	if all[0].Comments() <= before {
		t.Fatal("no keepalive during the outage")
	}
	all = append(all, ssetest.Open(t, in.URL()+"/events/c0"))
	for _, s := range all {
		select {
		case <-s.Done():
			t.Fatalf("a stream ended during the outage: %v", s.Err())
		default:
		}
	}

	rs.Restart()
	waitMetrics(t, in, "caddy_sse_redis_connected 1", "caddy_sse_redis_reconnects_total 1")
	rdb := rs.Client()
	for c := 0; c < 5; c++ {
		ssetest.WaitNumsub(t, rdb, fmt.Sprint("c", c), 1, 5*time.Second)
		rdb.Publish(context.Background(), fmt.Sprint("c", c), "after the outage")
	}
	for _, s := range all {
		ssetest.Expect(t, s, "after the outage")
	}
}

// When the subscription connection is lost while Redis still takes
// publishes, resumable channels catch up from history: nothing is lost.
func TestSubscriptionLossLosesNoResumableEvent(t *testing.T) {
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	in := caddyproc.Start(t, outageCaddyfile, caddyproc.Options{"{REDIS}": rs.URL()})
	rdb := rs.Client()
	waitFunctions(t, rdb)
	s := ssetest.Open(t, in.URL()+"/resumable/x")
	ctx := context.Background()
	const events = 300
	for i := 0; i < events; i++ {
		if i == 100 {
			// Cut the instance's subscription connection; publishers go on.
			if err := rdb.Do(ctx, "CLIENT", "KILL", "TYPE", "pubsub").Err(); err != nil {
				t.Fatal(err)
			}
		}
		if err := rdb.FCall(ctx, "sse_publish", []string{"r:x"}, strconv.Itoa(i)).Err(); err != nil {
			t.Fatal(err)
		}
		if i >= 100 && i < 200 {
			time.Sleep(2 * time.Millisecond) // spread over the reconnect
		}
	}
	for i := 0; i < events; i++ {
		ev, err := s.Next(10 * time.Second)
		if err != nil {
			t.Fatalf("event %d: %v", i, err)
		}
		if ev.Data != strconv.Itoa(i) {
			t.Fatalf("got event %q, want %d", ev.Data, i)
		}
	}
	waitMetrics(t, in, "caddy_sse_redis_reconnects_total 1")
}

// max_duration closes streams (with jitter) and the clients resume without
// losing anything.
func TestMaxDurationResumes(t *testing.T) {
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	in := caddyproc.Start(t, outageCaddyfile, caddyproc.Options{"{REDIS}": rs.URL()})
	rdb := rs.Client()
	waitFunctions(t, rdb)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const events = 120
	got := make(chan error, 1)
	ready := make(chan struct{})
	go func() {
		want, last, reconnects := 0, "", 0
		for want < events {
			var hdr []string
			if last != "" {
				hdr = []string{"Last-Event-ID", last}
			}
			s, err := sseclient.Get(ctx, in.URL()+"/short/md", hdr...)
			if err != nil {
				got <- err
				return
			}
			if reconnects == 0 {
				close(ready)
			}
			for want < events {
				ev, err := s.Next(5 * time.Second)
				if err != nil {
					break // closed by max_duration: resume
				}
				if ev.Data != strconv.Itoa(want) {
					s.Close()
					got <- fmt.Errorf("got %q, want %d", ev.Data, want)
					return
				}
				want++
				last = ev.ID
			}
			s.Close()
			reconnects++
		}
		if reconnects < 2 {
			got <- fmt.Errorf("the stream was closed %d times in 3s with max_duration 1s", reconnects)
			return
		}
		got <- nil
	}()
	<-ready
	for i := 0; i < events; i++ {
		rdb.FCall(context.Background(), "sse_publish", []string{"md"}, strconv.Itoa(i))
		time.Sleep(25 * time.Millisecond)
	}
	if err := <-got; err != nil {
		t.Fatal(err)
	}
}

// Stopping Caddy ends every stream promptly instead of waiting forever for
// them in the graceful shutdown.
func TestStopEndsStreamsPromptly(t *testing.T) {
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	in := caddyproc.Start(t, outageCaddyfile, caddyproc.Options{"{REDIS}": rs.URL()})
	var streams []*sseclient.Stream
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i := 0; i < 200; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			s, err := sseclient.Get(context.Background(), in.URL()+fmt.Sprintf("/events/s%d", i%20))
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			streams = append(streams, s)
			mu.Unlock()
		}(i)
	}
	wg.Wait()
	took, err := in.Stop(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("caddy exited %v after /stop with %d open streams", took, len(streams))
	for _, s := range streams {
		select {
		case <-s.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("a stream is still open after caddy exited")
		}
	}
}

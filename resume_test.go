package caddysse_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

var resumeCaddyfile = globalOptions + `
http://127.0.0.1:{HTTP} {
	sse /events/* {
		redis {REDIS}
		channel {path.1}
		history 10000 1h
		buffer 64
	}
	sse /multi/* {
		redis {REDIS}
		channel a:{path.1} b:{path.1}
		history 10000 1h
	}
	sse /short/* {
		redis {REDIS}
		channel short:{path.1}
		history 5
	}
	sse_publish /publish/* {
		redis {REDIS}
		channel {path.1}
		history 10000 1h
		max_size 1KiB
	}
}
`

type cluster struct {
	redis *redistest.Server
	rdb   *redis.Client
	a, b  *caddyproc.Instance
}

// startTwo runs two Caddy instances on one Redis, as behind a load balancer.
func startTwo(t *testing.T) *cluster {
	t.Helper()
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	vars := caddyproc.Options{"{REDIS}": rs.URL()}
	c := &cluster{redis: rs, rdb: rs.Client()}
	c.a = caddyproc.Start(t, resumeCaddyfile, vars)
	c.b = caddyproc.Start(t, resumeCaddyfile, vars)
	waitFunctions(t, c.rdb)
	return c
}

// fcall publishes a resumable event the way a legacy backend would: one
// Redis command.
func (c *cluster) fcall(t testing.TB, channel, payload string) uint64 {
	t.Helper()
	id, err := strconv.ParseUint(ssetest.PublishResumable(t, c.rdb, channel, payload), 10, 64)
	if err != nil {
		t.Fatalf("FCALL sse_publish %s: id %v", channel, err)
	}
	return id
}

func TestResumeOnAnotherInstance(t *testing.T) {
	c := startTwo(t)
	s := ssetest.Open(t, c.a.URL()+"/events/feed")
	var ids []uint64
	for i := 1; i <= 3; i++ {
		ids = append(ids, c.fcall(t, "feed", fmt.Sprint("event ", i)))
	}
	evs := ssetest.Expect(t, s, "event 1", "event 2", "event 3")
	for i, ev := range evs {
		if ev.ID != strconv.FormatUint(ids[i], 10) {
			t.Fatalf("event %d has id %q, want the published id %d", i+1, ev.ID, ids[i])
		}
	}
	last := s.LastEventID()
	s.Close()
	for i := 4; i <= 6; i++ {
		c.fcall(t, "feed", fmt.Sprint("event ", i))
	}
	r := ssetest.Open(t, c.b.URL()+"/events/feed", "Last-Event-ID", last)
	ssetest.Expect(t, r, "event 4", "event 5", "event 6")
	c.fcall(t, "feed", "event 7")
	ssetest.Expect(t, r, "event 7")
	ssetest.NoEvent(t, r, 200*time.Millisecond)

	// A first page load resumes with the lastEventId query parameter.
	q := ssetest.Open(t, c.a.URL()+"/events/feed?lastEventId="+last)
	ssetest.Expect(t, q, "event 4", "event 5", "event 6", "event 7")
}

func TestResumeTwoChannelsInterleaved(t *testing.T) {
	c := startTwo(t)
	s := ssetest.Open(t, c.a.URL()+"/multi/x")
	c.fcall(t, "a:x", "a1")
	c.fcall(t, "b:x", "b1")
	c.fcall(t, "a:x", "a2")
	ssetest.Expect(t, s, "a1", "b1", "a2")
	last := s.LastEventID()
	s.Close()
	c.fcall(t, "b:x", "b2")
	c.fcall(t, "a:x", "a3")
	c.fcall(t, "b:x", "b3")
	c.fcall(t, "a:other", "not mine")
	r := ssetest.Open(t, c.b.URL()+"/multi/x", "Last-Event-ID", last)
	ssetest.Expect(t, r, "b2", "a3", "b3")
	c.fcall(t, "a:x", "a4")
	ssetest.Expect(t, r, "a4")
	ssetest.NoEvent(t, r, 200*time.Millisecond)
}

func TestResumeRoundTripsBytes(t *testing.T) {
	c := startTwo(t)
	s := ssetest.Open(t, c.a.URL()+"/events/bytes")
	payloads := []string{"", " ", "a\nb", "tab\there", "ünïcödé ✓", strings.Repeat("z", 64<<10), `{"json":["x"]}`}
	for _, p := range payloads {
		c.fcall(t, "bytes", p)
	}
	live := ssetest.Expect(t, s, payloads...)
	// 0 asks for everything retained (an id below the first one this
	// Redis issued cannot be proven gapless: see TestResumeAfterFlushAll).
	r := ssetest.Open(t, c.b.URL()+"/events/bytes", "Last-Event-ID", "0")
	replayed := ssetest.Expect(t, r, payloads...)
	for i := range live {
		if live[i].ID != replayed[i].ID {
			t.Fatalf("event %d: live id %q, replayed id %q", i, live[i].ID, replayed[i].ID)
		}
	}
}

func TestReplayLargerThanBuffer(t *testing.T) {
	c := startTwo(t)
	s := ssetest.Open(t, c.a.URL()+"/events/big")
	c.fcall(t, "big", "first")
	ssetest.Expect(t, s, "first")
	last := s.LastEventID()
	s.Close()
	const missed = 5000
	pipe := c.rdb.Pipeline()
	for i := 0; i < missed; i++ {
		pipe.FCall(context.Background(), "sse_publish", []string{"big"}, fmt.Sprint(i))
	}
	if _, err := pipe.Exec(context.Background()); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	r := ssetest.Open(t, c.b.URL()+"/events/big", "Last-Event-ID", last)
	for i := 0; i < missed; i++ {
		ev, err := r.Next(10 * time.Second)
		if err != nil {
			t.Fatalf("after %d of %d replayed events: %v", i, missed, err)
		}
		if ev.Data != fmt.Sprint(i) {
			t.Fatalf("replayed event %d has data %q", i, ev.Data)
		}
	}
	t.Logf("replayed %d events through a stream with buffer 64 in %v", missed, time.Since(start))
	c.fcall(t, "big", "live")
	ssetest.Expect(t, r, "live")
}

// After FLUSHALL the history a client would resume from is gone, and
// nothing left in Redis says so but the new epoch: the resume cannot be
// proven gapless, so the client is told it may have missed events.
func TestResumeAfterFlushAll(t *testing.T) {
	c := startTwo(t)
	s := ssetest.Open(t, c.a.URL()+"/events/flush")
	c.fcall(t, "flush", "1")
	c.fcall(t, "flush", "2")
	ssetest.Expect(t, s, "1", "2")
	last := s.LastEventID()
	s.Close()
	if err := c.rdb.FlushAll(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
	c.fcall(t, "flush", "3")
	r := ssetest.Open(t, c.b.URL()+"/events/flush", "Last-Event-ID", last)
	if ev := ssetest.Next(t, r); ev.Event != "sse-missed" || ev.ID != "" {
		t.Fatalf("first event after FLUSHALL = %+v, want sse-missed without id", ev)
	}
	ssetest.Expect(t, r, "3")
	// A resume from an id of the new era is gapless again.
	id := r.LastEventID()
	c.fcall(t, "flush", "4")
	r2 := ssetest.Open(t, c.a.URL()+"/events/flush", "Last-Event-ID", id)
	ssetest.Expect(t, r2, "4")
}

func TestResumeOlderThanRetention(t *testing.T) {
	c := startTwo(t)
	s := ssetest.Open(t, c.a.URL()+"/short/k")
	c.fcall(t, "short:k", "kept?")
	ssetest.Expect(t, s, "kept?")
	last := s.LastEventID()
	s.Close()
	// Retention is set per publish here (the library default is the largest
	// history of the configs on this Redis).
	for i := 0; i < 300; i++ {
		if err := c.rdb.FCall(context.Background(), "sse_publish", []string{"short:k"}, fmt.Sprint(i), 5).Err(); err != nil {
			t.Fatal(err)
		}
	}
	r := ssetest.Open(t, c.b.URL()+"/short/k", "Last-Event-ID", last)
	ev := ssetest.Next(t, r)
	if ev.Event != "sse-missed" || ev.ID != "" {
		t.Fatalf("first event after a too old id = %+v, want the sse-missed event without id", ev)
	}
	var body struct{ After string }
	if err := json.Unmarshal([]byte(ev.Data), &body); err != nil || body.After != last {
		t.Fatalf("sse-missed data %q, want after=%s", ev.Data, last)
	}
	// Then what is retained, ending with the newest.
	var lastData string
	for {
		ev, err := r.Next(500 * time.Millisecond)
		if err != nil {
			break
		}
		lastData = ev.Data
	}
	if lastData != "299" {
		t.Fatalf("last replayed event %q, want 299", lastData)
	}
}

// TestNoLossWhileReconnecting publishes in a loop while clients keep
// disconnecting and resuming on alternate instances; every client must see
// every event exactly once, in order.
func TestNoLossWhileReconnecting(t *testing.T) {
	c := startTwo(t)
	const clients, events = 6, 600
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	var wg sync.WaitGroup
	errs := make(chan error, clients)
	ready := make(chan struct{}, clients)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			errs <- followWithReconnects(ctx, []*caddyproc.Instance{c.a, c.b}, i, events, ready)
		}(i)
	}
	for i := 0; i < clients; i++ {
		<-ready
	}
	for n := 0; n < events; n++ {
		c.fcall(t, "loop", strconv.Itoa(n))
		if n%50 == 0 {
			time.Sleep(5 * time.Millisecond)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

func followWithReconnects(ctx context.Context, instances []*caddyproc.Instance, client, events int, ready chan<- struct{}) error {
	want := 0
	lastID := ""
	for round := 0; want < events; round++ {
		in := instances[(client+round)%len(instances)]
		header := []string{}
		if lastID != "" {
			header = []string{"Last-Event-ID", lastID}
		}
		s, err := sseclient.Get(ctx, in.URL()+"/events/loop", header...)
		if err != nil {
			return fmt.Errorf("client %d round %d: %w", client, round, err)
		}
		if round == 0 {
			ready <- struct{}{}
		}
		// Take a few events, then drop the connection mid-stream.
		quota := 20 + (client*7+round*13)%60
		for k := 0; k < quota && want < events; k++ {
			ev, err := s.Next(10 * time.Second)
			if err != nil {
				s.Close()
				return fmt.Errorf("client %d round %d: waiting for event %d: %w", client, round, want, err)
			}
			if ev.Data != strconv.Itoa(want) {
				s.Close()
				return fmt.Errorf("client %d round %d: got event %q, want %d", client, round, ev.Data, want)
			}
			want++
			lastID = ev.ID
		}
		s.Close()
	}
	return nil
}

func TestPublishOverHTTP(t *testing.T) {
	c := startTwo(t)
	s := ssetest.Open(t, c.b.URL()+"/events/http")
	post := func(path, body string) (int, string) {
		code, _, answer := ssetest.Do(t, http.MethodPost, c.a.URL()+path, body, "Content-Type", "application/json")
		return code, answer
	}
	status, body := post("/publish/http", `{"text":"from http"}`)
	if status != http.StatusOK {
		t.Fatalf("publish: %d %s", status, body)
	}
	var answer struct{ ID string }
	if err := json.Unmarshal([]byte(body), &answer); err != nil || answer.ID == "" {
		t.Fatalf("publish answered %q, want the event id", body)
	}
	ev := ssetest.Next(t, s)
	if ev.Data != `{"text":"from http"}` || ev.ID != answer.ID {
		t.Fatalf("got %+v, want the published body with id %s", ev, answer.ID)
	}
	// It is resumable like any history event.
	status, body = post("/publish/http", `{"text":"second"}`)
	if status != http.StatusOK {
		t.Fatalf("publish: %d %s", status, body)
	}
	ssetest.Expect(t, s, `{"text":"second"}`)
	r := ssetest.Open(t, c.a.URL()+"/events/http", "Last-Event-ID", answer.ID)
	ssetest.Expect(t, r, `{"text":"second"}`)

	if status, body := post("/publish/http", strings.Repeat("x", 1025)); status != http.StatusRequestEntityTooLarge {
		t.Fatalf("oversized publish: %d %s", status, body)
	}
	if status, _ := post("/publish/", "x"); status != http.StatusBadRequest {
		t.Fatalf("publish without channel: %d", status)
	}
	resp, err := http.Get(c.a.URL() + "/publish/http")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed || resp.Header.Get("Allow") != "POST" {
		t.Fatalf("GET on publish: %d Allow %q", resp.StatusCode, resp.Header.Get("Allow"))
	}
	ssetest.NoEvent(t, s, 200*time.Millisecond)
}

// BenchmarkPublish compares a plain PUBLISH with the resumable one-command
// publish (history written atomically with the live publish).
func BenchmarkPublish(b *testing.B) {
	rs := redistest.Start(b)
	rdb := rs.Client()
	ctx := context.Background()
	payload := bytes.Repeat([]byte("p"), 100)
	loadFunctions(b, rs)
	b.Run("plain", func(b *testing.B) {
		for b.Loop() {
			if err := rdb.Publish(ctx, "bench", payload).Err(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("history", func(b *testing.B) {
		for b.Loop() {
			if err := rdb.FCall(ctx, "sse_publish", []string{"bench"}, payload).Err(); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// loadFunctions starts a Caddy with history on rs so that the functions are
// installed, and leaves it running.
func loadFunctions(tb testing.TB, rs *redistest.Server) {
	tb.Helper()
	caddyproc.Start(tb, resumeCaddyfile, caddyproc.Options{"{REDIS}": rs.URL()})
	waitFunctions(tb, rs.Client())
}

// waitFunctions waits until a Caddy started with history installed its
// functions in Redis (done in the background at start).
func waitFunctions(tb testing.TB, rdb *redis.Client) {
	tb.Helper()
	redistest.WaitLibrary(tb, rdb, "caddy_sse")
}

package broker

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-sse/caddy-sse/internal/redistest"
)

// Subscribe returns only once Redis confirmed: a PUBLISH right after it
// returns must reach exactly one subscriber, every time.
func TestSubscribeReturnsAfterConfirmation(t *testing.T) {
	srv := redistest.Start(t)
	rec := newRecorder()
	b := newBroker(t, srv, rec, Metrics{})
	ctx := ctxT(t)
	c := srv.Client()
	const n = 200
	for i := range n {
		ch := "confirm:" + strconv.Itoa(i)
		if err := b.Subscribe(ctx, ch); err != nil {
			t.Fatalf("Subscribe(%s): %v", ch, err)
		}
		receivers, err := c.Publish(ctx, ch, strconv.Itoa(i)).Result()
		if err != nil {
			t.Fatal(err)
		}
		if receivers != 1 {
			t.Fatalf("iteration %d: PUBLISH reached %d subscribers right after Subscribe returned, want 1", i, receivers)
		}
	}
	msgs := rec.waitMessages(t, n)
	for i, m := range msgs {
		if want := "confirm:" + strconv.Itoa(i); m.Channel != want || string(m.Payload) != strconv.Itoa(i) || m.Seq != 0 {
			t.Fatalf("message %d = %+v, want channel %s payload %d seq 0", i, m, want, i)
		}
	}
}

func TestSubscribeConcurrent(t *testing.T) {
	srv := redistest.Start(t)
	rec := newRecorder()
	m := newMetrics()
	b := newBroker(t, srv, rec, m.Metrics)
	ctx := ctxT(t)
	const goroutines, per = 20, 5
	var wg sync.WaitGroup
	errs := make(chan error, goroutines)
	for g := range goroutines {
		wg.Go(func() {
			chans := make([]string, per)
			for i := range chans {
				// Every goroutine shares channel "shared" and has its own.
				chans[i] = fmt.Sprintf("g%d:%d", g, i)
			}
			chans[0] = "shared"
			if err := b.Subscribe(ctx, chans...); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	c := srv.Client()
	for g := range goroutines {
		for i := 1; i < per; i++ {
			ch := fmt.Sprintf("g%d:%d", g, i)
			if n := numsub(t, c, ch); n != 1 {
				t.Fatalf("NUMSUB %s = %d, want 1", ch, n)
			}
		}
	}
	if n := numsub(t, c, "shared"); n != 1 {
		t.Fatalf("NUMSUB shared = %d, want 1 (one connection)", n)
	}
	if got, want := m.channels(), float64(goroutines*(per-1)+1); got != want {
		t.Fatalf("Channels gauge = %v, want %v", got, want)
	}
}

// Messages reach the handler with their channel, in the order Redis
// delivered them, across channels.
func TestRoutingAndOrder(t *testing.T) {
	srv := redistest.Start(t)
	rec := newRecorder()
	m := newMetrics()
	b := newBroker(t, srv, rec, m.Metrics)
	ctx := ctxT(t)
	chans := []string{"a", "b", "c"}
	if err := b.Subscribe(ctx, chans...); err != nil {
		t.Fatal(err)
	}
	if err := srv.Client().Publish(ctx, "not-subscribed", "x").Err(); err != nil {
		t.Fatal(err)
	}
	const n = 300
	pipe := srv.Client().Pipeline()
	for i := range n {
		pipe.Publish(ctx, chans[i%3], strconv.Itoa(i))
	}
	if _, err := pipe.Exec(ctx); err != nil {
		t.Fatal(err)
	}
	msgs := rec.waitMessages(t, n)
	if len(msgs) != n {
		t.Fatalf("got %d messages, want %d", len(msgs), n)
	}
	for i, msg := range msgs {
		if msg.Channel != chans[i%3] || string(msg.Payload) != strconv.Itoa(i) {
			t.Fatalf("message %d = %s %q, want %s %q", i, msg.Channel, msg.Payload, chans[i%3], strconv.Itoa(i))
		}
	}
	if got := m.received(); got != n {
		t.Fatalf("Received counter = %v, want %d", got, n)
	}
}

func TestUnsubscribe(t *testing.T) {
	srv := redistest.Start(t)
	m := newMetrics()
	b := newBroker(t, srv, newRecorder(), m.Metrics)
	ctx := ctxT(t)
	c := srv.Client()
	if err := b.Subscribe(ctx, "a", "b", "a"); err != nil {
		t.Fatal(err)
	}
	if numsub(t, c, "a") != 1 || numsub(t, c, "b") != 1 {
		t.Fatalf("NUMSUB a, b = %d, %d, want 1, 1", numsub(t, c, "a"), numsub(t, c, "b"))
	}
	if got := m.channels(); got != 2 {
		t.Fatalf("Channels gauge = %v, want 2", got)
	}
	b.Unsubscribe("a")
	if got := m.channels(); got != 1 {
		t.Fatalf("Channels gauge = %v, want 1", got)
	}
	eventually(t, "NUMSUB a = 0", func() bool { return numsub(t, c, "a") == 0 })
	if n := numsub(t, c, "b"); n != 1 {
		t.Fatalf("NUMSUB b = %d, want 1", n)
	}
	b.Unsubscribe("never-subscribed") // answered by Redis all the same; must not confuse the reader
	if err := b.Subscribe(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	if n := numsub(t, c, "c"); n != 1 {
		t.Fatalf("NUMSUB c = %d, want 1", n)
	}
}

// SUBSCRIBE, UNSUBSCRIBE, SUBSCRIBE of one channel in quick succession ends
// subscribed, and each Subscribe is released by its own confirmation.
func TestSubscribeUnsubscribeSubscribe(t *testing.T) {
	srv := redistest.Start(t)
	rec := newRecorder()
	b := newBroker(t, srv, rec, Metrics{})
	ctx := ctxT(t)
	c := srv.Client()
	for i := range 100 {
		if err := b.Subscribe(ctx, "flip"); err != nil {
			t.Fatal(err)
		}
		b.Unsubscribe("flip")
		if err := b.Subscribe(ctx, "flip"); err != nil {
			t.Fatal(err)
		}
		if n := numsub(t, c, "flip"); n != 1 {
			t.Fatalf("iteration %d: NUMSUB flip = %d, want 1", i, n)
		}
	}
	if err := c.Publish(ctx, "flip", "last").Err(); err != nil {
		t.Fatal(err)
	}
	if m := rec.waitMessages(t, 1); string(m[0].Payload) != "last" {
		t.Fatalf("got %q", m[0].Payload)
	}
}

// The reader hands messages straight to the handler: no Go channel that
// could fill up and drop or stall. 100k messages all arrive, in order.
func TestManyMessagesInOrder(t *testing.T) {
	srv := redistest.Start(t)
	rec := newRecorder()
	b := newBroker(t, srv, rec, Metrics{})
	ctx := ctxT(t)
	if err := b.Subscribe(ctx, "flood"); err != nil {
		t.Fatal(err)
	}
	const n, batch = 100_000, 1000
	c := srv.Client()
	for i := 0; i < n; i += batch {
		pipe := c.Pipeline()
		for j := i; j < i+batch; j++ {
			pipe.Publish(ctx, "flood", strconv.Itoa(j))
		}
		if _, err := pipe.Exec(ctx); err != nil {
			t.Fatal(err)
		}
	}
	msgs := rec.waitMessages(t, n)
	for i, m := range msgs {
		if string(m.Payload) != strconv.Itoa(i) {
			t.Fatalf("message %d = %q", i, m.Payload)
		}
	}
}

// A Redis outage: the broker notices, reports it, refuses to wait in
// Subscribe, reconnects with every channel (including one asked for during
// the outage) and tells the handler once.
func TestOutageAndReconnect(t *testing.T) {
	srv := redistest.Start(t)
	rec := newRecorder()
	m := newMetrics()
	core, logs := observer.New(zap.DebugLevel)
	b := newBrokerLog(t, srv, rec, m.Metrics, zap.New(core))
	ctx := ctxT(t)
	if err := b.Subscribe(ctx, "before"); err != nil {
		t.Fatal(err)
	}
	if !b.Connected() || m.connected() != 1 {
		t.Fatalf("Connected() = %v, gauge %v after Subscribe, want true, 1", b.Connected(), m.connected())
	}

	srv.Stop()
	eventually(t, "Connected() false", func() bool { return !b.Connected() })
	if got := m.connected(); got != 0 {
		t.Fatalf("Connected gauge = %v during outage, want 0", got)
	}
	err := b.Subscribe(ctx, "during")
	if !errors.Is(err, ErrDown) {
		t.Fatalf("Subscribe during outage = %v, want ErrDown", err)
	}
	if got := m.channels(); got != 2 {
		t.Fatalf("Channels gauge = %v, want 2 (the one asked for during the outage counts)", got)
	}

	// Let a few reconnect attempts fail: the outage is logged once, not
	// once per attempt.
	eventually(t, "failed reconnect attempts", func() bool {
		return logs.FilterMessage("redis reconnect attempt failed").Len() >= 2
	})
	if n := logs.FilterLevelExact(zap.WarnLevel).Len(); n != 1 {
		t.Fatalf("%d warnings for one outage, want 1: %v", n, logs.FilterLevelExact(zap.WarnLevel).All())
	}

	srv.Restart()
	eventually(t, "HandleReconnect", func() bool { return rec.reconnects.Load() > 0 })
	if !b.Connected() || m.connected() != 1 {
		t.Fatalf("after reconnect: Connected() = %v, gauge %v", b.Connected(), m.connected())
	}
	c := srv.Client()
	for _, ch := range []string{"before", "during"} {
		if n := numsub(t, c, ch); n != 1 {
			t.Fatalf("NUMSUB %s = %d after reconnect, want 1", ch, n)
		}
		if err := c.Publish(ctx, ch, "after:"+ch).Err(); err != nil {
			t.Fatal(err)
		}
	}
	msgs := rec.waitMessages(t, 2)
	if string(msgs[0].Payload) != "after:before" || string(msgs[1].Payload) != "after:during" {
		t.Fatalf("messages after reconnect = %+v", msgs)
	}
	if got := rec.reconnects.Load(); got != 1 {
		t.Fatalf("HandleReconnect called %d times, want 1", got)
	}
	if got := m.reconnects(); got != 1 {
		t.Fatalf("Reconnects counter = %v, want 1", got)
	}
	if n := logs.FilterMessage("redis subscription connection re-established").Len(); n != 1 {
		t.Fatalf("%d reconnect log lines, want 1", n)
	}
}

// Killing the subscription connection (Redis stays up) is an outage too:
// go-redis would silently redial and resubscribe, hiding the gap.
func TestConnectionKilled(t *testing.T) {
	srv := redistest.Start(t)
	rec := newRecorder()
	m := newMetrics()
	b := newBroker(t, srv, rec, m.Metrics)
	ctx := ctxT(t)
	if err := b.Subscribe(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	c := srv.Client()
	if err := c.ClientKillByFilter(ctx, "TYPE", "pubsub").Err(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "HandleReconnect", func() bool { return rec.reconnects.Load() == 1 })
	if got := m.reconnects(); got != 1 {
		t.Fatalf("Reconnects counter = %v, want 1", got)
	}
	if n := numsub(t, c, "k"); n != 1 {
		t.Fatalf("NUMSUB k = %d, want 1", n)
	}
	if err := c.Publish(ctx, "k", "x").Err(); err != nil {
		t.Fatal(err)
	}
	rec.waitMessages(t, 1)
}

// A connection that stays open but answers nothing is found dead by the
// health check.
func TestSilentConnectionDetected(t *testing.T) {
	srv := redistest.Start(t)
	rec := newRecorder()
	b := newBroker(t, srv, rec, Metrics{})
	ctx := ctxT(t)
	if err := b.Subscribe(ctx, "s"); err != nil {
		t.Fatal(err)
	}
	// CLIENT PAUSE ALL holds every client's commands, the broker's PING too.
	if err := srv.Client().Do(ctx, "CLIENT", "PAUSE", "1500", "ALL").Err(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "Connected() false", func() bool { return !b.Connected() })
	eventually(t, "HandleReconnect", func() bool { return rec.reconnects.Load() == 1 })
	if err := srv.Client().Publish(ctx, "s", "x").Err(); err != nil {
		t.Fatal(err)
	}
	rec.waitMessages(t, 1)
}

// New never fails because Redis is unreachable: it is an outage from the
// start, and the first connection counts as a reconnect.
func TestNewWhileRedisDown(t *testing.T) {
	srv := redistest.Start(t)
	srv.Stop()
	rec := newRecorder()
	m := newMetrics()
	b := newBroker(t, srv, rec, m.Metrics)
	ctx := ctxT(t)
	if err := b.Subscribe(ctx, "early"); !errors.Is(err, ErrDown) {
		t.Fatalf("Subscribe with Redis down = %v, want ErrDown", err)
	}
	if b.Connected() {
		t.Fatal("Connected() with Redis down")
	}
	srv.Restart()
	eventually(t, "HandleReconnect", func() bool { return rec.reconnects.Load() == 1 })
	if n := numsub(t, srv.Client(), "early"); n != 1 {
		t.Fatalf("NUMSUB early = %d, want 1", n)
	}
	if got := m.reconnects(); got != 1 {
		t.Fatalf("Reconnects = %v, want 1", got)
	}
}

func TestSubscribeContextEnds(t *testing.T) {
	srv := redistest.Start(t)
	b := newBroker(t, srv, newRecorder(), Metrics{})
	ctx := ctxT(t)
	if err := b.Subscribe(ctx, "warm"); err != nil {
		t.Fatal(err)
	}
	if err := srv.Client().Do(ctx, "CLIENT", "PAUSE", "300", "ALL").Err(); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := b.Subscribe(short, "paused"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Subscribe = %v, want context.DeadlineExceeded", err)
	}
	// The subscription still completes once Redis answers.
	eventually(t, "NUMSUB paused = 1", func() bool { return numsub(t, srv.Client(), "paused") == 1 })
}

func TestClose(t *testing.T) {
	srv := redistest.Start(t)
	m := newMetrics()
	b := newBroker(t, srv, newRecorder(), m.Metrics)
	ctx := ctxT(t)
	if err := b.Subscribe(ctx, "x"); err != nil {
		t.Fatal(err)
	}
	if err := srv.Client().Do(ctx, "CLIENT", "PAUSE", "2000", "ALL").Err(); err != nil {
		t.Fatal(err)
	}
	waiting := make(chan error, 1)
	go func() { waiting <- b.Subscribe(ctx, "y") }()
	eventually(t, "Subscribe queued", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		for _, r := range b.inflight.items[b.inflight.head:] {
			if r.w != nil {
				return true
			}
		}
		return false
	})
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-waiting; !errors.Is(err, ErrClosed) {
		t.Fatalf("waiting Subscribe = %v, want ErrClosed", err)
	}
	if err := b.Subscribe(ctx, "z"); !errors.Is(err, ErrClosed) {
		t.Fatalf("Subscribe after Close = %v, want ErrClosed", err)
	}
	if err := b.Close(); !errors.Is(err, ErrClosed) {
		t.Fatalf("second Close = %v, want ErrClosed", err)
	}
	if b.Connected() || m.connected() != 0 {
		t.Fatal("connected after Close")
	}
}

// A Subscribe that Redis refuses (ACL) returns the error instead of
// hanging, and the connection keeps working.
func TestSubscribeRefused(t *testing.T) {
	srv := redistest.Start(t)
	ctx := ctxT(t)
	c := srv.Client()
	// Each channel comes with its resumable twin: an ACL allows both.
	opts := limitedUser(t, srv, "ok:*", "sse:r:ok:*", "half")
	rec := newRecorder()
	m := newMetrics()
	b := startBroker(t, Options{Redis: opts, Metrics: m.Metrics}, rec)
	if err := b.Subscribe(ctx, "ok:1"); err != nil {
		t.Fatal(err)
	}
	err := b.Subscribe(ctx, "forbidden")
	var rerr redis.Error
	if !errors.As(err, &rerr) {
		t.Fatalf("Subscribe(forbidden) = %v, want a Redis error", err)
	}
	// Allowed without its twin is refused too: it could not receive
	// resumable events.
	if err := b.Subscribe(ctx, "half"); !errors.As(err, &rerr) {
		t.Fatalf("Subscribe(half) = %v, want a Redis error", err)
	}
	if got := m.channels(); got != 1 {
		t.Fatalf("Channels gauge = %v, want 1", got)
	}
	if err := b.Subscribe(ctx, "ok:2"); err != nil {
		t.Fatal(err)
	}
	if err := c.Publish(ctx, "ok:2", "x").Err(); err != nil {
		t.Fatal(err)
	}
	rec.waitMessages(t, 1)
	if rec.reconnects.Load() != 0 {
		t.Fatal("a refused Subscribe caused a reconnect")
	}
}

func TestNewInvalidOptions(t *testing.T) {
	good := &redis.UniversalOptions{Addrs: []string{"127.0.0.1:6379"}}
	for name, tc := range map[string]struct {
		opts Options
		h    Handler
	}{
		"nil handler":    {Options{Redis: good}, nil},
		"nil redis":      {Options{}, newRecorder()},
		"no address":     {Options{Redis: &redis.UniversalOptions{}}, newRecorder()},
		"empty address":  {Options{Redis: &redis.UniversalOptions{Addrs: []string{""}}}, newRecorder()},
		"negative check": {Options{Redis: good, HealthCheck: -time.Second}, newRecorder()},
		"cluster db":     {Options{Redis: &redis.UniversalOptions{Addrs: []string{"a:1"}, DB: 2}, Cluster: true}, newRecorder()},
	} {
		t.Run(name, func(t *testing.T) {
			if b, err := New(tc.opts, tc.h); err == nil {
				_ = b.Close()
				t.Fatal("New succeeded")
			}
		})
	}
}

// A channel that became forbidden while subscribed (ACL changed: Redis
// drops the connection) is dropped on resubscription; the others come back.
func TestResubscribeRefused(t *testing.T) {
	srv := redistest.Start(t)
	ctx := ctxT(t)
	c := srv.Client()
	opts := limitedUser(t, srv, "ok:*", "sse:r:ok:*", "soon-bad", "sse:r:soon-bad")
	rec := newRecorder()
	m := newMetrics()
	b := startBroker(t, Options{Redis: opts, Metrics: m.Metrics, HealthCheck: 200 * time.Millisecond}, rec)
	if err := b.Subscribe(ctx, "ok:1", "soon-bad", "ok:2"); err != nil {
		t.Fatal(err)
	}
	if err := c.Do(ctx, "ACL", "SETUSER", "limited", "resetchannels", "&ok:*", "&sse:r:ok:*").Err(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "HandleReconnect", func() bool { return rec.reconnects.Load() == 1 })
	if got := m.channels(); got != 2 {
		t.Fatalf("Channels gauge = %v, want 2", got)
	}
	for _, ch := range []string{"ok:1", "ok:2"} {
		if n := numsub(t, c, ch); n != 1 {
			t.Fatalf("NUMSUB %s = %d, want 1", ch, n)
		}
	}
}

// Large payloads that contain RESP frames arrive intact: the reader never
// reads with a deadline that could leave it mid-frame and parse the rest
// of a payload as replies.
func TestLargePayloadsStayFramed(t *testing.T) {
	if testing.Short() {
		t.Skip("moves 40 MB through Redis; skipped with -short")
	}
	srv := redistest.Start(t)
	rec := newRecorder()
	// A short health check, so that the watchdog runs while each message is
	// read; not so short that a loaded machine (a -race build on two busy
	// cores) pauses the reader past it between two messages.
	b := startBroker(t, Options{Redis: parsedURL(t, srv.URL()), HealthCheck: 250 * time.Millisecond}, rec)
	ctx := ctxT(t)
	if err := b.Subscribe(ctx, "big", "admin"); err != nil {
		t.Fatal(err)
	}
	fake := "*3\r\n$7\r\nmessage\r\n$5\r\nadmin\r\n$4\r\nevil\r\n"
	payload := strings.Repeat(fake, 4<<20/len(fake))
	const n = 10
	for i := range n {
		if err := srv.Client().Publish(ctx, "big", payload).Err(); err != nil {
			t.Fatal(err)
		}
		// One at a time: Redis cuts a subscriber that lags 32 MB behind.
		rec.waitMessages(t, i+1)
	}
	msgs := rec.messages()
	for i, m := range msgs {
		if m.Channel != "big" || string(m.Payload) != payload {
			t.Fatalf("message %d on %q, %d bytes: not the payload published", i, m.Channel, len(m.Payload))
		}
	}
	if got := rec.reconnects.Load(); got != 0 {
		t.Fatalf("%d reconnects", got)
	}
}

package broker

import (
	"bytes"
	"context"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-sse/caddy-sse/internal/redistest"
)

// Close waits for every goroutine of the broker: the reader, the writer,
// the watchdog and probe, the library check, the presence and lifecycle
// writers with their final writes, and what Go ran.
func TestCloseLeavesNoGoroutine(t *testing.T) {
	srv := redistest.Start(t)
	before := brokerGoroutines()
	opts, err := ParseURL(srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	b, err := New(Options{Redis: opts, HealthCheck: 200 * time.Millisecond, Probe: 50 * time.Millisecond,
		LibraryCheck: 50 * time.Millisecond}, newRecorder())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := b.Subscribe(ctx, "x"); err != nil {
		t.Fatal(err)
	}
	b.EnablePresence(0)
	b.EnableLifecycle()
	b.PresenceAdd([]string{"x"}, "alice", 1)
	b.Lifecycle(LifecycleEvent{Stream: "life", MaxLen: 10, Type: "open", Channels: "x", Time: time.Now()})

	started := make(chan struct{})
	var ended atomic.Bool
	if !b.Go(func(ctx context.Context) {
		close(started)
		<-ctx.Done()
		time.Sleep(20 * time.Millisecond)
		ended.Store(true)
	}) {
		t.Fatal("Go before Close = false")
	}
	<-started

	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if !ended.Load() {
		t.Fatal("Close returned before the function given to Go")
	}
	if b.Go(func(context.Context) { t.Error("a function given to Go after Close ran") }) {
		t.Fatal("Go after Close = true")
	}
	// A goroutine that Close waited for may still be on its way out after
	// its last deferred call.
	deadline := time.Now().Add(2 * time.Second)
	for brokerGoroutines() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("goroutines of the broker left after Close:\n%s", buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// brokerGoroutines counts the goroutines running a method of this
// package's types.
func brokerGoroutines() int {
	buf := make([]byte, 1<<20)
	n := 0
	for _, g := range bytes.Split(buf[:runtime.Stack(buf, true)], []byte("\n\n")) {
		if bytes.Contains(g, []byte("caddy-sse/broker.(*")) {
			n++
		}
	}
	return n
}

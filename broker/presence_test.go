package broker

import (
	"context"
	"fmt"
	"reflect"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/internal/redistest"
)

// newInstance starts a broker named instance on srv, as one Caddy
// instance would, with presence on at ttl.
func newInstance(t *testing.T, srv *redistest.Server, instance string, ttl time.Duration, m Metrics) *Broker {
	t.Helper()
	opts := parsedURL(t, srv.URL())
	// One dial per try instead of go-redis's five, 100ms apart: the tests
	// stop Redis on purpose, and a write to it then fails (and is counted)
	// in a fraction of a second rather than seconds, Close's included.
	opts.DialerRetries = 1
	b := startBroker(t, Options{Redis: opts, Metrics: m,
		HealthCheck: 200 * time.Millisecond, Instance: instance}, newRecorder())
	b.EnablePresence(ttl)
	return b
}

// presenceOf reads a channel's presence the way a backend does: one FCALL.
func presenceOf(t testing.TB, c redis.Cmdable, channel string) map[string]int64 {
	t.Helper()
	v, err := c.FCall(context.Background(), PresenceFunction, []string{PresenceKeyPrefix + channel}).Slice()
	if err != nil {
		t.Fatalf("FCALL %s: %v", PresenceFunction, err)
	}
	if len(v)%2 != 0 {
		t.Fatalf("FCALL %s returned an odd list %v", PresenceFunction, v)
	}
	out := map[string]int64{}
	for i := 0; i < len(v); i += 2 {
		out[v[i].(string)] = v[i+1].(int64)
	}
	return out
}

// waitPresence polls until the channel's presence is want.
func waitPresence(t testing.TB, c redis.Cmdable, channel string, want map[string]int64) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		got := presenceOf(t, c, channel)
		if reflect.DeepEqual(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("presence of %s is %v, want %v", channel, got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestPresenceAcrossInstances(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client()
	a := newInstance(t, srv, "a", 0, Metrics{})
	b := newInstance(t, srv, "b", 0, Metrics{})
	redistest.WaitLibrary(t, rdb, PresenceLibraryName)

	a.PresenceAdd([]string{"room:1", "user:alice"}, "alice", 1)
	a.PresenceAdd([]string{"room:1"}, "alice", 1)
	b.PresenceAdd([]string{"room:1"}, "alice", 1)
	b.PresenceAdd([]string{"room:1"}, "bob", 1)
	a.PresenceAdd([]string{"room:1"}, "", 1) // anonymous: not counted
	waitPresence(t, rdb, "room:1", map[string]int64{"alice": 3, "bob": 1})
	waitPresence(t, rdb, "user:alice", map[string]int64{"alice": 1})

	// The raw hash: one field per instance and identity.
	raw, err := rdb.HGetAll(context.Background(), PresenceKeyPrefix+"room:1").Result()
	if err != nil {
		t.Fatal(err)
	}
	if want := map[string]string{"a|alice": "2", "b|alice": "1", "b|bob": "1"}; !reflect.DeepEqual(raw, want) {
		t.Fatalf("HGETALL = %v, want %v", raw, want)
	}
	if ttl := rdb.TTL(context.Background(), InstanceKeyPrefix+"a").Val(); ttl <= 0 || ttl > DefaultPresenceTTL {
		t.Fatalf("liveness key of a has ttl %v, want up to %v", ttl, DefaultPresenceTTL)
	}

	a.PresenceAdd([]string{"room:1"}, "alice", -1)
	b.PresenceAdd([]string{"room:1"}, "bob", -1)
	waitPresence(t, rdb, "room:1", map[string]int64{"alice": 2})
	if rdb.HExists(context.Background(), PresenceKeyPrefix+"room:1", "b|bob").Val() {
		t.Fatal("a field at 0 was left in the hash")
	}

	// A clean stop removes the instance's fields and liveness key at once.
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if raw := rdb.HGetAll(context.Background(), PresenceKeyPrefix+"room:1").Val(); !reflect.DeepEqual(raw, map[string]string{"a|alice": "1"}) {
		t.Fatalf("after b closed, HGETALL = %v", raw)
	}
	if n := rdb.Exists(context.Background(), InstanceKeyPrefix+"b").Val(); n != 0 {
		t.Fatal("b's liveness key outlived its Close")
	}
}

// The fields of an instance whose liveness key is gone are skipped and
// deleted by the read; the instance, if alive after all, writes them again
// at its next refresh.
func TestPresenceDeadInstance(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client()
	ctx := context.Background()
	a := newInstance(t, srv, "a", MinPresenceTTL, Metrics{})
	redistest.WaitLibrary(t, rdb, PresenceLibraryName)
	a.PresenceAdd([]string{"room:1"}, "alice", 2)
	waitPresence(t, rdb, "room:1", map[string]int64{"alice": 2})

	// A dead instance's leftovers, and a field that is not the module's.
	rdb.HSet(ctx, PresenceKeyPrefix+"room:1", "ghost|bob", 4, "no-separator", 7)
	if got := presenceOf(t, rdb, "room:1"); !reflect.DeepEqual(got, map[string]int64{"alice": 2}) {
		t.Fatalf("presence = %v, want alice only", got)
	}
	if rdb.HExists(ctx, PresenceKeyPrefix+"room:1", "ghost|bob").Val() {
		t.Fatal("the dead instance's field was not deleted by the read")
	}
	if !rdb.HExists(ctx, PresenceKeyPrefix+"room:1", "no-separator").Val() {
		t.Fatal("a field that is not the module's was deleted")
	}

	// a's liveness key expires (as after a stall): readers drop its
	// fields, and a writes them back at its next refresh.
	rdb.Del(ctx, InstanceKeyPrefix+"a")
	if got := presenceOf(t, rdb, "room:1"); len(got) != 0 {
		t.Fatalf("presence = %v with a's liveness key gone", got)
	}
	waitPresence(t, rdb, "room:1", map[string]int64{"alice": 2})

	// Identities may hold the separator: the instance part ends at the first.
	a.PresenceAdd([]string{"room:2"}, "x|y", 1)
	waitPresence(t, rdb, "room:2", map[string]int64{"x|y": 1})

	if _, err := rdb.FCall(ctx, PresenceFunction, []string{"room:1"}).Result(); err == nil {
		t.Fatal("FCALL with a key that is not a presence key succeeded")
	}
}

// After Redis restarts without its data, the instance writes its whole
// presence and the function library back.
func TestPresenceAfterRedisRestart(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client()
	a := newInstance(t, srv, "a", 0, Metrics{})
	redistest.WaitLibrary(t, rdb, PresenceLibraryName)
	a.PresenceAdd([]string{"room:1", "room:2"}, "alice", 1)
	waitPresence(t, rdb, "room:1", map[string]int64{"alice": 1})

	srv.Restart()
	redistest.WaitLibrary(t, rdb, PresenceLibraryName)
	waitPresence(t, rdb, "room:1", map[string]int64{"alice": 1})
	waitPresence(t, rdb, "room:2", map[string]int64{"alice": 1})
}

// While Redis is down, changes wait in memory; failures are counted; once
// it is back, what Redis holds is the current state.
func TestPresenceFlushFailures(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client()
	failures := prometheus.NewCounter(prometheus.CounterOpts{Name: "presence_failures"})
	a := newInstance(t, srv, "a", 0, Metrics{PresenceFailures: failures})
	redistest.WaitLibrary(t, rdb, PresenceLibraryName)
	a.PresenceAdd([]string{"room:1"}, "alice", 1)
	a.PresenceAdd([]string{"room:1"}, "bob", 1)
	waitPresence(t, rdb, "room:1", map[string]int64{"alice": 1, "bob": 1})

	srv.Stop()
	a.PresenceAdd([]string{"room:1"}, "bob", -1)
	a.PresenceAdd([]string{"room:1"}, "carol", 1)
	eventually(t, "a failed presence write", func() bool { return testutil.ToFloat64(failures) > 0 })
	srv.Restart()
	redistest.WaitLibrary(t, rdb, PresenceLibraryName)
	waitPresence(t, rdb, "room:1", map[string]int64{"alice": 1, "carol": 1})
}

func TestLifecycleEntries(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client()
	dropped := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "lifecycle_dropped"}, []string{"reason"})
	b := newInstance(t, srv, "a", 0, Metrics{LifecycleDropped: dropped})
	b.EnableLifecycle()
	at := time.UnixMilli(1700000000123)
	if !b.Lifecycle(LifecycleEvent{Stream: "life", MaxLen: 100, Type: "open", Channels: "a,b", Identity: "alice", Time: at}) {
		t.Fatal("Lifecycle refused an entry")
	}
	b.Lifecycle(LifecycleEvent{Stream: "life", MaxLen: 100, Type: "close", Channels: "a,b", Identity: "alice", Reason: "client", Time: at})
	var entries []redis.XMessage
	eventually(t, "two entries", func() bool {
		entries = rdb.XRange(context.Background(), "life", "-", "+").Val()
		return len(entries) == 2
	})
	want := []map[string]any{
		{"type": "open", "channels": "a,b", "identity": "alice", "instance": "a", "time": "1700000000123"},
		{"type": "close", "channels": "a,b", "identity": "alice", "instance": "a", "reason": "client", "time": "1700000000123"},
	}
	for i, e := range entries {
		if !reflect.DeepEqual(e.Values, want[i]) {
			t.Fatalf("entry %d = %v, want %v", i, e.Values, want[i])
		}
	}

	// A Redis that fails the writes: entries are dropped and counted, and
	// Lifecycle never blocks.
	srv.Stop()
	start := time.Now()
	for i := range 2 * LifecycleQueue {
		b.Lifecycle(LifecycleEvent{Stream: "life", MaxLen: 100, Type: "open", Channels: fmt.Sprint(i), Time: at})
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("queueing %d entries took %v", 2*LifecycleQueue, d)
	}
	if n := testutil.ToFloat64(dropped.WithLabelValues(DropQueueFull)); n < LifecycleQueue/2 {
		t.Fatalf("dropped for a full queue: %v", n)
	}
	eventually(t, "entries dropped by a failing Redis", func() bool {
		return testutil.ToFloat64(dropped.WithLabelValues(DropRedis)) > 0
	})
}

package caddysse_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

// presenceTTL is the presence ttl of the test configs: a killed instance
// stops counting within it.
const presenceTTL = 3 * time.Second

// The identity comes from a header to keep the tests short; the README
// shows it from basic_auth and a JWT.
var presenceCaddyfile = globalOptions + `
http://127.0.0.1:{HTTP} {
	sse /room/* {
		redis {REDIS}
		channel room:{path.1}
		presence {header.X-User} 3s
		lifecycle sse:lifecycle 1000
	}
	sse /std/* {
		redis {REDIS}
		channel room:{path.1}
		presence {header.X-User} 3s
		lifecycle sse:lifecycle 1000
		takeover off
	}
	sse /short/* {
		redis {REDIS}
		channel room:{path.1} user:{header.X-User}
		presence {header.X-User} 3s
		lifecycle sse:lifecycle 1000
		max_duration 1s
	}
	sse_health /healthz {
		redis {REDIS}
	}
}
`

func startPresence(t *testing.T, rs *redistest.Server) *caddyproc.Instance {
	t.Helper()
	in := caddyproc.Start(t, presenceCaddyfile, caddyproc.Options{"{REDIS}": rs.URL()})
	redistest.WaitLibrary(t, rs.Client(), "caddy_sse_presence")
	return in
}

func openAs(t *testing.T, in *caddyproc.Instance, path, user string) *sseclient.Stream {
	t.Helper()
	return ssetest.Open(t, in.URL()+path, "X-User", user)
}

// presence reads a channel's presence as a backend does: one FCALL.
func presence(t testing.TB, c redis.Cmdable, channel string) map[string]int64 {
	t.Helper()
	v, err := c.FCall(context.Background(), "sse_presence", []string{"{sse}:presence:" + channel}).Slice()
	if err != nil {
		t.Fatalf("FCALL sse_presence: %v", err)
	}
	out := map[string]int64{}
	for i := 0; i+1 < len(v); i += 2 {
		out[v[i].(string)] = v[i+1].(int64)
	}
	return out
}

// waitPresence polls until a channel's presence is want, for at most
// within.
func waitPresence(t testing.TB, c redis.Cmdable, channel string, within time.Duration, want map[string]int64) {
	t.Helper()
	var got map[string]int64
	ssetest.Wait(t, within, fmt.Sprintf("presence of %s to be %v", channel, want), func() bool {
		got = presence(t, c, channel)
		return reflect.DeepEqual(got, want)
	}, func() string { return fmt.Sprint("it is ", got) })
}

// instanceOf is an instance's name in Redis, from GET /sse/stats.
func instanceOf(t *testing.T, in *caddyproc.Instance) string {
	t.Helper()
	var stats struct{ Instance string }
	if err := json.Unmarshal([]byte(ssetest.Metrics(t, in.AdminURL()+"/sse/stats")), &stats); err != nil || stats.Instance == "" {
		t.Fatalf("GET /sse/stats has no instance: %v", err)
	}
	return stats.Instance
}

// Streams of two instances add up, per identity; closing a stream and
// stopping an instance cleanly take them away.
func TestPresenceAcrossInstances(t *testing.T) {
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	rdb := rs.Client()
	a, b := startPresence(t, rs), startPresence(t, rs)
	a1 := openAs(t, a, "/room/1", "alice")
	openAs(t, a, "/std/1", "alice") // served without takeover
	openAs(t, b, "/room/1", "alice")
	openAs(t, b, "/room/1", "bob")
	ssetest.Open(t, a.URL()+"/room/1") // no identity: anonymous, not counted
	waitPresence(t, rdb, "room:1", 5*time.Second, map[string]int64{"alice": 3, "bob": 1})

	// The raw hash, for debugging: one field per instance and identity.
	ia, ib := instanceOf(t, a), instanceOf(t, b)
	raw := rdb.HGetAll(context.Background(), "{sse}:presence:room:1").Val()
	if want := map[string]string{ia + "|alice": "2", ib + "|alice": "1", ib + "|bob": "1"}; !reflect.DeepEqual(raw, want) {
		t.Fatalf("HGETALL {sse}:presence:room:1 = %v, want %v", raw, want)
	}

	a1.Close()
	waitPresence(t, rdb, "room:1", 5*time.Second, map[string]int64{"alice": 2, "bob": 1})

	// A clean stop removes the instance's entries before the process
	// exits: no waiting for its liveness key to expire.
	if _, err := b.Stop(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	if got := presence(t, rdb, "room:1"); !reflect.DeepEqual(got, map[string]int64{"alice": 1}) {
		t.Fatalf("right after B stopped, presence is %v, want alice 1", got)
	}
	if raw := rdb.HGetAll(context.Background(), "{sse}:presence:room:1").Val(); len(raw) != 1 {
		t.Fatalf("right after B stopped, HGETALL = %v", raw)
	}
	if n := rdb.Exists(context.Background(), "{sse}:instance:"+ib).Val(); n != 0 {
		t.Fatal("B's liveness key outlived its stop")
	}
	// B's streams ended with the stop, and the lifecycle stream says so.
	var closes []string
	for _, e := range rdb.XRange(context.Background(), "sse:lifecycle", "-", "+").Val() {
		if e.Values["instance"] == ib && e.Values["type"] == "close" {
			closes = append(closes, e.Values["identity"].(string)+" "+e.Values["reason"].(string))
		}
	}
	sort.Strings(closes)
	if want := []string{"alice shutdown", "bob shutdown"}; !reflect.DeepEqual(closes, want) {
		t.Fatalf("B's close entries %q, want %q", closes, want)
	}
}

// An instance killed with its streams open stops counting within the ttl,
// and the read deletes its leftovers: no cleanup job.
func TestPresenceKilledInstance(t *testing.T) {
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	rdb := rs.Client()
	a, b := startPresence(t, rs), startPresence(t, rs)
	openAs(t, a, "/room/1", "alice")
	openAs(t, b, "/room/1", "bob")
	openAs(t, b, "/room/1", "alice")
	waitPresence(t, rdb, "room:1", 5*time.Second, map[string]int64{"alice": 2, "bob": 1})
	ib := instanceOf(t, b)

	killed := time.Now()
	b.Kill()
	// Redis expires the liveness key at most ttl after its last refresh;
	// the margin covers the polling.
	waitPresence(t, rdb, "room:1", presenceTTL+1500*time.Millisecond, map[string]int64{"alice": 1})
	t.Logf("the killed instance left the presence %v after kill -9 (ttl %v)", time.Since(killed).Round(10*time.Millisecond), presenceTTL)
	for f := range rdb.HGetAll(context.Background(), "{sse}:presence:room:1").Val() {
		if strings.HasPrefix(f, ib+"|") {
			t.Fatalf("the killed instance's field %q is still in the hash", f)
		}
	}
}

// After Redis restarts without its data, the instance writes its presence
// (and the function library) back while its streams stay open.
func TestPresenceAfterRedisRestart(t *testing.T) {
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	rdb := rs.Client()
	in := startPresence(t, rs)
	s := openAs(t, in, "/room/1", "alice")
	openAs(t, in, "/std/1", "alice")
	openAs(t, in, "/room/2", "bob")
	waitPresence(t, rdb, "room:1", 5*time.Second, map[string]int64{"alice": 2})

	rs.Restart()
	redistest.WaitLibrary(t, rdb, "caddy_sse_presence")
	waitPresence(t, rdb, "room:1", 10*time.Second, map[string]int64{"alice": 2})
	waitPresence(t, rdb, "room:2", 5*time.Second, map[string]int64{"bob": 1})
	ssetest.WaitNumsub(t, rdb, "room:1", 1, 5*time.Second)
	rdb.Publish(context.Background(), "room:1", "after the restart")
	ssetest.Expect(t, s, "after the restart")
}

// Every open and every end is in the lifecycle stream, with its channels,
// identity, instance, time and (at the end) the reason the stream ended,
// the same as the streams_closed_total metric's.
func TestLifecycleEvents(t *testing.T) {
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	rdb := rs.Client()
	in := startPresence(t, rs)
	inst := instanceOf(t, in)
	start := time.Now()
	alice := openAs(t, in, "/room/1", "alice")
	bob := openAs(t, in, "/std/2", "bob")
	anon := ssetest.Open(t, in.URL()+"/room/3")
	carol := openAs(t, in, "/short/4", "carol") // ends itself after max_duration
	waitMetric(t, in, "caddy_sse_streams_open", 5*time.Second, ssetest.Is(4))
	alice.Close()
	bob.Close()
	anon.Close()
	select {
	case <-carol.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the max_duration stream did not end")
	}
	waitMetric(t, in, "caddy_sse_streams_open", 5*time.Second, ssetest.Is(0))

	type entry struct{ typ, channels, identity, reason string }
	want := map[entry]int{
		{"open", "room:1", "alice", ""}:                         1,
		{"open", "room:2", "bob", ""}:                           1,
		{"open", "room:3", "", ""}:                              1,
		{"open", "room:4,user:carol", "carol", ""}:              1,
		{"close", "room:1", "alice", "client"}:                  1,
		{"close", "room:2", "bob", "client"}:                    1,
		{"close", "room:3", "", "client"}:                       1,
		{"close", "room:4,user:carol", "carol", "max_duration"}: 1,
	}
	var entries []redis.XMessage
	ssetest.Wait(t, 5*time.Second, "8 lifecycle entries", func() bool {
		entries = rdb.XRange(context.Background(), "sse:lifecycle", "-", "+").Val()
		return len(entries) >= len(want)
	})
	got := map[entry]int{}
	opened := map[string]bool{}
	for _, e := range entries {
		v := e.Values
		if v["instance"] != inst {
			t.Fatalf("entry %v: instance %v, want %s", v, v["instance"], inst)
		}
		ms, err := strconv.ParseInt(v["time"].(string), 10, 64)
		if err != nil || ms < start.UnixMilli() || ms > time.Now().UnixMilli() {
			t.Fatalf("entry %v: time %v is not a unix ms time of the test", v, v["time"])
		}
		reason, _ := v["reason"].(string)
		en := entry{v["type"].(string), v["channels"].(string), v["identity"].(string), reason}
		got[en]++
		// Every end comes after its open.
		if en.typ == "open" {
			opened[en.channels] = true
		} else if !opened[en.channels] {
			t.Fatalf("close of %s before its open", en.channels)
		}
		if len(v) != 5 && en.typ == "open" || len(v) != 6 && en.typ == "close" {
			t.Fatalf("entry %v has unexpected fields", v)
		}
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("lifecycle entries %v, want %v", got, want)
	}
	// The reasons are the metric's.
	if n := ssetest.Metric(t, in.AdminURL()+"/metrics", `caddy_sse_streams_closed_total{reason="client"}`); n != 3 {
		t.Fatalf("streams closed by the client: %v, want 3", n)
	}
	if n := ssetest.Metric(t, in.AdminURL()+"/metrics", `caddy_sse_streams_closed_total{reason="max_duration"}`); n != 1 {
		t.Fatalf("streams closed by max_duration: %v, want 1", n)
	}
}

// A Redis that refuses the lifecycle writes costs the entries (counted),
// never the streams.
func TestLifecycleDroppedStreamsGoOn(t *testing.T) {
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	rdb := rs.Client()
	// The stream key holds a string: every XADD fails with WRONGTYPE.
	if err := rdb.Set(context.Background(), "sse:lifecycle", "not a stream", 0).Err(); err != nil {
		t.Fatal(err)
	}
	in := startPresence(t, rs)
	s := openAs(t, in, "/room/1", "alice")
	openAs(t, in, "/std/1", "bob").Close()
	waitMetric(t, in, `caddy_sse_lifecycle_dropped_total{reason="redis"}`, 10*time.Second,
		func(v float64) bool { return v >= 3 })
	ssetest.WaitNumsub(t, rdb, "room:1", 1, 5*time.Second)
	rdb.Publish(context.Background(), "room:1", "still here")
	ssetest.Expect(t, s, "still here")
	// Presence is written all the same.
	waitPresence(t, rdb, "room:1", 5*time.Second, map[string]int64{"alice": 1})
}

// sse_health answers 200 while the Redis subscription is up, 503 with the
// reason while it is down, and 200 again once it is back; /sse/stats shows
// the same.
func TestHealth(t *testing.T) {
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	in := startPresence(t, rs)
	get := func(method string) (int, string) {
		code, _, body := ssetest.Do(t, method, in.URL()+"/healthz", "")
		return code, body
	}
	waitStatus := func(want int) string {
		t.Helper()
		var code int
		var body string
		ssetest.Wait(t, 10*time.Second, "sse_health "+strconv.Itoa(want), func() bool {
			code, body = get(http.MethodGet)
			return code == want
		})
		return body
	}
	body := waitStatus(http.StatusOK)
	if !strings.Contains(body, `"status":"up"`) {
		t.Fatalf("healthy answer %q", body)
	}
	if code, body := get(http.MethodHead); code != http.StatusOK || body != "" {
		t.Fatalf("HEAD: %d %q", code, body)
	}
	if code, _ := get(http.MethodPost); code != http.StatusMethodNotAllowed {
		t.Fatalf("POST: %d, want 405", code)
	}

	rs.Stop()
	body = waitStatus(http.StatusServiceUnavailable)
	if !strings.Contains(body, "redis subscription down since ") || !strings.Contains(body, `"status":"down"`) {
		t.Fatalf("unhealthy answer %q lacks the reason", body)
	}
	if stats := ssetest.Metrics(t, in.AdminURL()+"/sse/stats"); !strings.Contains(stats, `"connected": false`) {
		t.Fatalf("/sse/stats during the outage:\n%s", stats)
	}

	rs.Restart()
	waitStatus(http.StatusOK)
	if stats := ssetest.Metrics(t, in.AdminURL()+"/sse/stats"); !strings.Contains(stats, `"connected": true`) {
		t.Fatalf("/sse/stats after the outage:\n%s", stats)
	}
}

var clusterPresenceCaddyfile = globalOptions + `
http://127.0.0.1:{HTTP} {
	sse /room/* {
		redis {
			addrs {NODES}
			cluster
		}
		channel {path.1}
		presence {header.X-User}
		lifecycle sse:lifecycle
	}
}
`

// Presence on a Redis Cluster: channels on every shard, read with one
// FCALL routed by the {sse} key; the lifecycle stream is written too.
func TestPresenceOnCluster(t *testing.T) {
	c := redistest.StartCluster(t, 3, 0)
	cc := c.Client()
	in := caddyproc.Start(t, clusterPresenceCaddyfile, caddyproc.Options{"{NODES}": strings.Join(c.Addrs(), " ")})
	redistest.WaitLibrary(t, c.MasterOf("{sse}:presence:x").Client(), "caddy_sse_presence")
	chans := channelsOnShards(t, c)
	for _, ch := range chans {
		openAs(t, in, "/room/"+ch, "alice")
		openAs(t, in, "/room/"+ch, "alice")
		openAs(t, in, "/room/"+ch, "bob")
	}
	for _, ch := range chans {
		waitPresence(t, cc, ch, 10*time.Second, map[string]int64{"alice": 2, "bob": 1})
	}
	ssetest.Wait(t, 10*time.Second, "lifecycle entries", func() bool {
		return cc.XLen(context.Background(), "sse:lifecycle").Val() >= int64(3*len(chans))
	})
	if _, err := in.Stop(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	for _, ch := range chans {
		if got := presence(t, cc, ch); len(got) != 0 {
			t.Fatalf("after a clean stop, presence of %s is %v", ch, got)
		}
	}
}

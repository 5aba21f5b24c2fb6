package caddysse_test

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

var sentinelCaddyfile = globalOptions + `
http://127.0.0.1:{HTTP} {
	sse /r/* {
		redis {
			addrs {SENTINELS}
			master_name mymaster
		}
		channel r:{path.1}
		history 1000
		keepalive 500ms
	}
	sse /p/* {
		redis {
			addrs {SENTINELS}
			master_name mymaster
		}
		channel p:{path.1}
		keepalive 500ms
	}
}
`

// SENTINEL FAILOVER: the old master keeps Caddy's subscription open and
// answers its PINGs, but publishes now go to the new master. The broker's
// probe notices, it moves to the new master, and resumable streams catch
// up from history: every event published on the new master arrives, in
// order, and plain PUBLISH reaches every stream again.
func TestSentinelFailoverKeepsStreams(t *testing.T) {
	testSentinelStreams(t, false)
}

// The master process dies: Caddy reconnects once the Sentinels promoted the
// replica, with the same guarantees.
func TestSentinelMasterKilledKeepsStreams(t *testing.T) {
	testSentinelStreams(t, true)
}

func testSentinelStreams(t *testing.T, kill bool) {
	st := redistest.StartSentinel(t, 1, 3)
	in := caddyproc.Start(t, sentinelCaddyfile, caddyproc.Options{
		"{SENTINELS}": strings.Join(st.SentinelAddrs(), " "),
	})
	ctx := context.Background()
	old := st.Master()
	rdb := old.Client()
	waitFunctions(t, rdb)

	const channels, perChannel = 4, 3
	var resumable, plain []*sseclient.Stream
	for i := range channels * perChannel {
		resumable = append(resumable, ssetest.Open(t, in.URL()+fmt.Sprintf("/r/c%d", i%channels)))
		plain = append(plain, ssetest.Open(t, in.URL()+fmt.Sprintf("/p/c%d", i%channels)))
	}
	ssetest.WaitNumsub(t, rdb, "r:c0", 1, 5*time.Second)

	// Each channel carries 0, 1, 2, ... so that a stream can tell a gap.
	next := make([]int, channels)
	publish := func(t *testing.T, m *redistest.Server, c int) {
		t.Helper()
		ch := fmt.Sprint("r:c", c)
		if err := m.Client().FCall(ctx, "sse_publish", []string{ch}, strconv.Itoa(next[c])).Err(); err != nil {
			t.Fatalf("FCALL on %s: %v", m.Addr(), err)
		}
		next[c]++
	}
	for i := range 20 {
		publish(t, old, i%channels)
	}
	// The replica has them all before the failover.
	if err := rdb.Do(ctx, "WAIT", 1, 5000).Err(); err != nil {
		t.Fatal(err)
	}

	var master *redistest.Server
	if kill {
		old.Stop()
		master = st.WaitNewMaster(old)
	} else {
		master = st.Failover()
	}
	// Published on the new master while Caddy may still listen to the old
	// one: the catch-up after the reconnect must deliver all of it.
	for i := range 40 {
		publish(t, master, i%channels)
		time.Sleep(25 * time.Millisecond)
	}
	for i, s := range resumable {
		c := i % channels
		for want := 0; want < next[c]; want++ {
			ev, err := s.Next(15 * time.Second)
			if err != nil {
				t.Fatalf("stream %d (r:c%d): waiting for %d: %v", i, c, want, err)
			}
			if ev.Data != strconv.Itoa(want) {
				t.Fatalf("stream %d (r:c%d): got %q, want %d", i, c, ev.Data, want)
			}
		}
	}
	if n := ssetest.Metric(t, in.AdminURL()+"/metrics", "caddy_sse_redis_reconnects_total"); n < 1 {
		t.Fatalf("caddy_sse_redis_reconnects_total %v after the failover", n)
	}
	waitMetrics(t, in, "caddy_sse_redis_connected 1")
	// Plain PUBLISH reaches every stream once the subscription is on the
	// new master.
	mrdb := master.Client()
	for c := range channels {
		ssetest.WaitNumsub(t, mrdb, fmt.Sprint("p:c", c), 1, 5*time.Second)
		if err := mrdb.Publish(ctx, fmt.Sprint("p:c", c), "after").Err(); err != nil {
			t.Fatal(err)
		}
	}
	for i, s := range plain {
		ev, err := s.Next(10 * time.Second)
		if err != nil || ev.Data != "after" {
			t.Fatalf("plain stream %d: %+v %v", i, ev, err)
		}
	}
	for _, s := range append(resumable, plain...) {
		select {
		case <-s.Done():
			t.Fatalf("a stream ended: %v", s.Err())
		default:
		}
	}
}

package broker

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/internal/redistest"
)

func newSentinelBroker(t *testing.T, st *redistest.Sentinel, h Handler, m Metrics) *Broker {
	t.Helper()
	return startBroker(t, Options{
		Redis:       &redis.UniversalOptions{Addrs: st.SentinelAddrs(), MasterName: redistest.MasterName},
		Metrics:     m,
		HealthCheck: 200 * time.Millisecond,
		Probe:       200 * time.Millisecond,
	}, h)
}

// After SENTINEL FAILOVER the old master keeps the subscription open and
// answers PINGs, but what is published goes to the new master: the probe
// notices, the broker moves to the new master and reports the gap, and
// history holds every event published on the new master.
func TestSentinelFailover(t *testing.T) {
	testSentinelFailover(t, false)
}

// The master process dies: the broker retries until the Sentinels have
// promoted the replica.
func TestSentinelMasterKilled(t *testing.T) {
	testSentinelFailover(t, true)
}

func testSentinelFailover(t *testing.T, kill bool) {
	st := redistest.StartSentinel(t, 1, 3)
	rec := newRecorder()
	m := newMetrics()
	b := newSentinelBroker(t, st, rec, m.Metrics)
	ctx := ctxT(t)
	if err := b.EnsureHistory(ctx, keep); err != nil {
		t.Fatal(err)
	}
	if err := b.Subscribe(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	before, err := b.Publish(ctx, "c", []byte("before"), keep)
	if err != nil {
		t.Fatal(err)
	}
	rec.waitMessages(t, 1)
	// Wait until the replica has the event, so that the failover keeps it.
	old := st.Master()
	if err := old.Client().Do(ctx, "WAIT", 1, 5000).Err(); err != nil {
		t.Fatal(err)
	}

	var master *redistest.Server
	if kill {
		old.Stop()
		master = st.WaitNewMaster(old)
	} else {
		master = st.Failover()
	}
	// Published on the new master: none of these may be lost.
	rdb := master.Client()
	var ids []uint64
	for i := range 20 {
		id, err := rdb.FCall(ctx, PublishFunction, []string{"c"}, strconv.Itoa(i)).Uint64()
		if err != nil {
			t.Fatal(err)
		}
		if id <= before {
			t.Fatalf("id %d after the failover is not above %d before it", id, before)
		}
		ids = append(ids, id)
		time.Sleep(20 * time.Millisecond)
	}
	eventually(t, "the reconnect", func() bool { return rec.reconnects.Load() >= 1 })
	if rec.disconnects.Load() < 1 {
		t.Fatal("HandleReconnect without HandleDisconnect")
	}
	if m.reconnects() < 1 || m.connected() != 1 {
		t.Fatalf("metrics: reconnects %v connected %v", m.reconnects(), m.connected())
	}
	// What the connection missed is in history, as the registry reads it
	// back after HandleReconnect.
	rp, err := b.Replay(ctx, []string{"c"}, before)
	if err != nil {
		t.Fatal(err)
	}
	if len(rp.Messages) != len(ids) || rp.Truncated {
		t.Fatalf("replay after %d: %d messages (truncated %v), want %d", before, len(rp.Messages), rp.Truncated, len(ids))
	}
	for i, msg := range rp.Messages {
		if msg.Seq != ids[i] || string(msg.Payload) != strconv.Itoa(i) {
			t.Fatalf("replayed %d: %d %q", i, msg.Seq, msg.Payload)
		}
	}
	// And the connection is live on the new master.
	n := len(rec.messages())
	if err := rdb.Publish(ctx, "c", "live").Err(); err != nil {
		t.Fatal(err)
	}
	if got := rec.waitMessages(t, n+1); string(got[len(got)-1].Payload) != "live" {
		t.Fatalf("last message %q, want live", got[len(got)-1].Payload)
	}
	if nsub := rdb.PubSubNumSub(context.Background(), "c").Val()["c"]; nsub != 1 {
		t.Fatalf("NUMSUB c on the new master = %d, want 1", nsub)
	}
}

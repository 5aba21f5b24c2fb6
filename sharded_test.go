package caddysse_test

import (
	"context"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/broker"
	"github.com/caddy-sse/caddy-sse/internal/caddytest"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
)

const shardedCaddyfile = globalOptions + `
http://127.0.0.1:{HTTP} {
	sse /s/* {
		redis {
			addrs {NODES}
			cluster
			sharded
		}
		channel {path.1}
		history 100000 1h
		buffer 2048
	}
	sse /m {
		redis {
			addrs {NODES}
			cluster
			sharded
		}
		channel {query.c}
		history 100000 1h
		buffer 2048
	}
	sse_publish /publish/* {
		redis {
			addrs {NODES}
			cluster
			sharded
		}
		channel {path.1}
		history 100000 1h
	}
}
`

// startSharded runs a Caddy in sharded mode on c and waits until the
// function library is on every master.
func startSharded(t *testing.T, c *redistest.Cluster) *caddytest.Instance {
	t.Helper()
	in := caddytest.Start(t, shardedCaddyfile, caddytest.Options{"{NODES}": strings.Join(c.Addrs(), " ")})
	for _, m := range c.Masters() {
		redistest.WaitLibrary(t, m.Client(), "caddy_sse")
	}
	return in
}

// spublish publishes a resumable event the way a backend does in sharded
// mode: one FCALL naming the channel's history key.
func spublish(t testing.TB, cc *redis.ClusterClient, channel, payload string) uint64 {
	t.Helper()
	id, err := cc.FCall(context.Background(), "sse_publish", []string{broker.ShardedHistoryKey(channel)}, payload).Uint64()
	if err != nil {
		t.Fatalf("FCALL sse_publish %s: %v", broker.ShardedHistoryKey(channel), err)
	}
	return id
}

// waitShardNumsub waits until every channel has n shard subscribers on
// its master (one per Caddy instance).
func waitShardNumsub(t *testing.T, c *redistest.Cluster, n int64, chans ...string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for _, ch := range chans {
		for {
			m, err := c.MasterOf(ch).Client().PubSubShardNumSub(context.Background(), ch).Result()
			if err == nil && m[ch] == n {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s has %d shard subscribers, want %d (%v)", ch, m[ch], n, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// A stream on channels of three shards gets their events with a vector
// id, and resumes from it on another instance: exactly what it missed on
// each shard, in publish order, then live events. A stream on one channel
// keeps plain ids, those the publisher got back.
func TestShardedResumeAcrossShards(t *testing.T) {
	c := redistest.StartCluster(t, 3, 1)
	a := startSharded(t, c)
	b := startSharded(t, c)
	cc := c.Client()
	ctx := context.Background()
	chans := channelsOnShards(t, c)
	if len(chans) != 3 {
		t.Fatalf("channels on %d shards, want 3", len(chans))
	}
	multiPath := "/m?c=" + strings.Join(chans, ",")
	single := openAt(t, a, "/s/"+chans[0])
	multi := openAt(t, a, multiPath)
	waitShardNumsub(t, c, 1, chans...)

	a1 := spublish(t, cc, chans[0], "a1")
	spublish(t, cc, chans[1], "b1")
	spublish(t, cc, chans[2], "c1")
	a2 := spublish(t, cc, chans[0], "a2")
	if err := cc.SPublish(ctx, chans[1], "plain").Err(); err != nil {
		t.Fatal(err)
	}
	resp, err := http.Post(b.URL()+"/publish/"+chans[2], "text/plain", strings.NewReader("http"))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"id":"`) {
		t.Fatalf("sse_publish: %s %s", resp.Status, body)
	}

	evs := expectData(t, single, "a1", "a2")
	if evs[0].ID != strconv.FormatUint(a1, 10) || evs[1].ID != strconv.FormatUint(a2, 10) {
		t.Fatalf("single-channel ids %q %q, want the published ids %d %d", evs[0].ID, evs[1].ID, a1, a2)
	}
	// Events of different shards come on different connections: only
	// each channel's order is set.
	got := expectAll(t, multi, "a1", "b1", "c1", "a2", "plain", "http")
	for i, ev := range got {
		if ev.Data == "plain" {
			if i == 0 || ev.ID != got[i-1].ID {
				t.Fatalf("a plain SPUBLISH moved the stream's id to %q", ev.ID)
			}
			continue
		}
		if !strings.HasPrefix(ev.ID, "v1.") || len(ev.ID) > 2+15*3 {
			t.Fatalf("event %q: id %q, want a vector of at most %d bytes", ev.Data, ev.ID, 2+15*3)
		}
		if i > 0 && ev.ID == got[i-1].ID {
			t.Fatalf("event %q did not move the id %q", ev.Data, ev.ID)
		}
	}
	if n := strings.Count(got[len(got)-1].ID, "."); n != 3 {
		t.Fatalf("id %q after events on each channel, want three positions", got[len(got)-1].ID)
	}
	last := multi.LastEventID()
	multi.Close()

	spublish(t, cc, chans[2], "c2")
	spublish(t, cc, chans[0], "a3")
	spublish(t, cc, chans[1], "b2")
	r := openAt(t, b, multiPath, "Last-Event-ID", last)
	expectData(t, r, "c2", "a3", "b2")
	spublish(t, cc, chans[1], "b3")
	expectData(t, r, "b3")
	noEvent(t, r, 300*time.Millisecond)

	// A single-channel stream resumes from its plain id on the other
	// instance; "0" replays everything retained on every channel.
	s2 := openAt(t, b, "/s/"+chans[0], "Last-Event-ID", evs[0].ID)
	expectData(t, s2, "a2", "a3")
	all := openAt(t, b, multiPath+"&lastEventId=0")
	expectData(t, all, "a1", "b1", "c1", "a2", "http", "c2", "a3", "b2", "b3")
	noEvent(t, all, 300*time.Millisecond)
}

// expectAll reads len(want) events and checks that they are want, each
// channel's (the data's first letter) in order, whatever the order between
// channels.
func expectAll(t testing.TB, s *sseclient.Stream, want ...string) []sseclient.Event {
	t.Helper()
	var got []sseclient.Event
	next := map[byte]int{}
	for range want {
		ev, err := s.Next(5 * time.Second)
		if err != nil {
			t.Fatalf("after %d of %q: %v (raw so far %q)", len(got), want, err, s.Raw())
		}
		got = append(got, ev)
	}
	for _, ev := range got {
		k := byte(0)
		if ev.Data != "" {
			k = ev.Data[0]
		}
		i := next[k]
		for i < len(want) && (want[i] == "" || want[i][0] != k) {
			i++
		}
		if i == len(want) || want[i] != ev.Data {
			t.Fatalf("got %q out of order or unexpected; want %q (each channel in order)", ev.Data, want)
		}
		next[k] = i + 1
	}
	return got
}

package caddysse_test

import (
	"context"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

var clusterCaddyfile = globalOptions + `
http://127.0.0.1:{HTTP} {
	sse /r/* {
		redis {
			addrs {NODES}
			cluster
		}
		channel {path.1}
		history 1000
	}
	sse /multi/* {
		redis {
			addrs {NODES}
			cluster
		}
		channel {path.1} {path.2}
		history 1000
	}
	sse_publish /publish/* {
		redis {
			addrs {NODES}
			cluster
		}
		channel {path.1}
		history 1000
	}
}
`

// channelsOnShards returns one channel name per master of the cluster.
func channelsOnShards(t *testing.T, c *redistest.Cluster) []string {
	t.Helper()
	seen := map[*redistest.Server]bool{}
	var out []string
	masters := len(c.Masters())
	for i := 0; len(out) < masters && i < 1000; i++ {
		ch := "room" + strconv.Itoa(i)
		if m := c.MasterOf(ch); !seen[m] {
			seen[m] = true
			out = append(out, ch)
		}
	}
	return out
}

func startClusterCaddy(t *testing.T, c *redistest.Cluster) *caddyproc.Instance {
	t.Helper()
	in := caddyproc.Start(t, clusterCaddyfile, caddyproc.Options{"{NODES}": strings.Join(c.Addrs(), " ")})
	waitFunctions(t, c.MasterOf("{sse}:seq").Client())
	return in
}

// In a cluster, channels on every shard reach their streams: PUBLISH from
// any node, FCALL with the {sse}:h:<channel> key, and the HTTP publisher.
// Ids come from one counter, so a stream on channels of two shards resumes
// from one Last-Event-ID on another instance.
func TestClusterChannelsOnEveryShard(t *testing.T) {
	c := redistest.StartCluster(t, 3, 0)
	a := startClusterCaddy(t, c)
	b := caddyproc.Start(t, clusterCaddyfile, caddyproc.Options{"{NODES}": strings.Join(c.Addrs(), " ")})
	ctx := context.Background()
	cc := c.Client()
	chans := channelsOnShards(t, c)
	if len(chans) != 3 {
		t.Fatalf("channels on %d shards, want 3", len(chans))
	}
	var streams []*sseclient.Stream
	for _, ch := range chans {
		streams = append(streams, ssetest.Open(t, a.URL()+"/r/"+ch))
	}
	multi := ssetest.Open(t, a.URL()+"/multi/"+chans[0]+"/"+chans[1])
	waitClusterNumsub(t, cc, chans)

	for i, ch := range chans {
		// From a node that does not serve the channel's slot.
		other := c.Nodes[(i+1)%len(c.Nodes)]
		if err := other.Client().Publish(ctx, ch, "plain "+ch).Err(); err != nil {
			t.Fatal(err)
		}
		if ev := ssetest.Next(t, streams[i]); ev.Data != "plain "+ch || ev.ID != "" {
			t.Fatalf("stream %s got %+v", ch, ev)
		}
	}
	for i, ch := range chans {
		id, err := cc.FCall(ctx, "sse_publish", []string{"{sse}:h:" + ch}, "fcall "+ch).Uint64()
		if err != nil {
			t.Fatal(err)
		}
		if ev := ssetest.Next(t, streams[i]); ev.Data != "fcall "+ch || ev.ID != strconv.FormatUint(id, 10) {
			t.Fatalf("stream %s got %+v, want id %d", ch, ev, id)
		}
		if code, _, body := ssetest.Do(t, http.MethodPost, a.URL()+"/publish/"+ch, "http "+ch, "Content-Type", "text/plain"); code != http.StatusOK {
			t.Fatalf("publish over HTTP: %d %s", code, body)
		}
		if ev := ssetest.Next(t, streams[i]); ev.Data != "http "+ch {
			t.Fatalf("stream %s got %+v", ch, ev)
		}
	}
	// The multi-channel stream saw its two shards' events in id order.
	evs := ssetest.Expect(t, multi, "plain "+chans[0], "plain "+chans[1],
		"fcall "+chans[0], "http "+chans[0], "fcall "+chans[1], "http "+chans[1])
	last := evs[3].ID
	multi.Close()
	cc.FCall(ctx, "sse_publish", []string{"{sse}:h:" + chans[1]}, "missed 1")
	cc.FCall(ctx, "sse_publish", []string{"{sse}:h:" + chans[0]}, "missed 2")
	r := ssetest.Open(t, b.URL()+"/multi/"+chans[0]+"/"+chans[1], "Last-Event-ID", last)
	ssetest.Expect(t, r, "fcall "+chans[1], "http "+chans[1], "missed 1", "missed 2")
}

// A master fails over to its replica while streams are open and resumable
// events are published: every event published after the failover reaches
// every stream, in order, and nothing is left subscribed on the old node.
func TestClusterFailoverKeepsStreams(t *testing.T) {
	c := redistest.StartCluster(t, 3, 1)
	in := startClusterCaddy(t, c)
	ctx := context.Background()
	cc := c.Client()
	chans := channelsOnShards(t, c)
	var streams []*sseclient.Stream
	for i := range 12 {
		streams = append(streams, ssetest.Open(t, in.URL()+"/r/"+chans[i%len(chans)]))
	}
	waitClusterNumsub(t, cc, chans)
	next := make([]int, len(chans))
	publish := func(i int) error {
		err := cc.FCall(ctx, "sse_publish", []string{"{sse}:h:" + chans[i]}, strconv.Itoa(next[i])).Err()
		if err == nil {
			next[i]++
		}
		return err
	}
	for i := range 12 {
		if err := publish(i % len(chans)); err != nil {
			t.Fatal(err)
		}
	}
	hist := c.MasterOf("{sse}:seq")
	if err := hist.Client().Do(ctx, "WAIT", 1, 5000).Err(); err != nil {
		t.Fatal(err)
	}
	hist.Stop()
	c.WaitOK()
	// The client's view of the slots catches up with the failover.
	deadline := time.Now().Add(30 * time.Second)
	for i := 0; i < 30; {
		if err := publish(i % len(chans)); err != nil {
			if time.Now().After(deadline) {
				t.Fatal(err)
			}
			// go-redis reloads its view of the slots on MOVED, not when
			// a master stops answering.
			cc.ReloadState(ctx)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		i++
	}
	for i, s := range streams {
		ch := i % len(chans)
		for want := 0; want < next[ch]; want++ {
			ev, err := s.Next(15 * time.Second)
			if err != nil {
				t.Fatalf("stream %d (%s): waiting for %d: %v", i, chans[ch], want, err)
			}
			if ev.Data != strconv.Itoa(want) {
				t.Fatalf("stream %d (%s): got %q, want %d", i, chans[ch], ev.Data, want)
			}
		}
	}
}

// waitClusterNumsub waits until each channel has a subscriber somewhere in
// the cluster (PUBSUB NUMSUB counts the node's own clients only).
func waitClusterNumsub(t *testing.T, cc *redis.ClusterClient, chans []string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for _, ch := range chans {
		for {
			var n atomic.Int64 // the shards are asked concurrently
			err := cc.ForEachShard(context.Background(), func(ctx context.Context, c *redis.Client) error {
				m, err := c.PubSubNumSub(ctx, ch).Result()
				n.Add(m[ch])
				return err
			})
			if err == nil && n.Load() > 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s not subscribed anywhere: %v", ch, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

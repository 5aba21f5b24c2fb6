package broker

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/internal/redistest"
)

// shardSubscribers counts, per node, the connections holding shard channel
// subscriptions (CLIENT LIST's ssub field).
func shardSubscribers(t *testing.T, c *redistest.Cluster) map[*redistest.Server]int {
	t.Helper()
	out := map[*redistest.Server]int{}
	for _, n := range c.Nodes {
		if !n.IsRunning() {
			continue
		}
		list, err := n.Client().ClientList(context.Background()).Result()
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(list, "\n") {
			if strings.Contains(l, " ssub=") && !strings.Contains(l, " ssub=0 ") {
				out[n]++
			}
		}
	}
	return out
}

// channelRecorder is a recorder that is told of the outages of some
// channels (a ChannelHandler): the channels held, and those released.
type channelRecorder struct {
	*recorder
	mu         sync.Mutex
	held, back []string
}

func (r *channelRecorder) HandleChannelsDown(channels []string) {
	r.mu.Lock()
	r.held = append(r.held, channels...)
	r.mu.Unlock()
	r.poke()
}

func (r *channelRecorder) HandleChannelsUp(channels []string) {
	r.mu.Lock()
	r.back = append(r.back, channels...)
	r.mu.Unlock()
	r.poke()
}

// outages are the channels held and released so far, sorted.
func (r *channelRecorder) outages() (held, back []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	held, back = slices.Clone(r.held), slices.Clone(r.back)
	slices.Sort(held)
	slices.Sort(back)
	return held, back
}

func TestShardedNeedsCluster(t *testing.T) {
	_, err := New(Options{Redis: &redis.UniversalOptions{Addrs: []string{"127.0.0.1:1"}}, Sharded: true}, newRecorder())
	if err == nil || !strings.Contains(err.Error(), "sharded") {
		t.Fatalf("New with Sharded on a single server: %v, want an error about sharded mode", err)
	}
}

// Channels of every shard, and names with hash tags or braces of their
// own, are subscribed on one connection per master, and their resumable
// events, published by the broker or with the documented FCALL, arrive
// with ids that count per channel and are kept in the channel's slot.
func TestShardedPublishAndHistory(t *testing.T) {
	skipShort(t)
	c := redistest.StartCluster(t, 3, 0)
	rec := newRecorder()
	b := newClusterBroker(t, c, true, rec, Metrics{})
	ctx := ctxT(t)
	if err := b.EnsureHistory(ctx, keep); err != nil {
		t.Fatal(err)
	}
	chans := append(channelsOnEveryMaster(t, c), "user:{42}", "a}b", "x{}y", "{a}", "a")
	if err := b.Subscribe(ctx, chans...); err != nil {
		t.Fatal(err)
	}
	for n, k := range shardSubscribers(t, c) {
		if k != 1 {
			t.Fatalf("%s has %d shard subscription connections, want 1", n.Addr(), k)
		}
	}
	if got := len(shardSubscribers(t, c)); got != 3 {
		t.Fatalf("shard subscription connections on %d nodes, want 3", got)
	}
	cc := c.Client()
	want := map[string][]string{}
	ids := map[string][]uint64{}
	for round := range 3 {
		for i, ch := range chans {
			p := fmt.Sprintf("%s #%d", ch, round)
			var id uint64
			var err error
			if i%2 == 0 {
				id, err = b.Publish(ctx, ch, []byte(p), keep)
			} else {
				id, err = cc.FCall(ctx, PublishFunction, []string{ShardedHistoryKey(ch)}, p).Uint64()
			}
			if err != nil {
				t.Fatalf("publish on %q: %v", ch, err)
			}
			want[ch] = append(want[ch], p)
			ids[ch] = append(ids[ch], id)
		}
	}
	if err := cc.SPublish(ctx, chans[0], "plain").Err(); err != nil {
		t.Fatal(err)
	}
	msgs := rec.waitMessages(t, 3*len(chans)+1)
	got := map[string][]Message{}
	for _, m := range msgs {
		got[m.Channel] = append(got[m.Channel], m)
	}
	for _, ch := range chans {
		var resumable []Message
		for _, m := range got[ch] {
			if m.Seq != 0 {
				resumable = append(resumable, m)
			} else if string(m.Payload) != "plain" || ch != chans[0] {
				t.Fatalf("%q: unexpected plain message %q", ch, m.Payload)
			}
		}
		if len(resumable) != 3 {
			t.Fatalf("%q: %d resumable messages, want 3: %+v", ch, len(resumable), got[ch])
		}
		for i, m := range resumable {
			if string(m.Payload) != want[ch][i] || m.Seq != ids[ch][i] {
				t.Fatalf("%q message %d: %q id %d, want %q id %d", ch, i, m.Payload, m.Seq, want[ch][i], ids[ch][i])
			}
		}
		// The history key is in the channel's slot, on its master.
		n, err := c.MasterOf(ch).Client().Exists(ctx, ShardedHistoryKey(ch)).Result()
		if err != nil || n != 1 {
			t.Fatalf("%q: history key %q on the channel's master: %d %v", ch, ShardedHistoryKey(ch), n, err)
		}
	}
	heads, err := b.Heads(ctx, chans)
	if err != nil {
		t.Fatal(err)
	}
	from := make([]uint64, len(chans))
	for i, ch := range chans {
		if heads[i] != ids[ch][2] {
			t.Fatalf("head of %q = %d, want %d", ch, heads[i], ids[ch][2])
		}
		from[i] = ids[ch][0] // replay what followed each channel's first event
	}
	pg, err := b.ReplayChannels(ctx, chans, from, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(pg.Messages) != 2*len(chans) || pg.Truncated || pg.More {
		t.Fatalf("replayed %d messages (truncated %v, more %v), want %d", len(pg.Messages), pg.Truncated, pg.More, 2*len(chans))
	}
	for i := 1; i < len(pg.Messages); i++ {
		if pg.Messages[i].Seq < pg.Messages[i-1].Seq {
			t.Fatalf("replay not in id order at %d", i)
		}
	}
	// The bare channel is refused with the key to name instead; so is
	// the cluster mode's key.
	for _, ch := range []string{chans[0], "a}b"} {
		err = cc.FCall(ctx, PublishFunction, []string{ch}, "x").Err()
		if err == nil || !strings.Contains(err.Error(), ShardedHistoryKey(ch)) {
			t.Fatalf("FCALL with the bare channel %q: %v, want an error naming %s", ch, err, ShardedHistoryKey(ch))
		}
	}
	err = cc.FCall(ctx, PublishFunction, []string{ClusterKeyPrefix + chans[0]}, "x").Err()
	if err == nil || !strings.Contains(err.Error(), "sharded") {
		t.Fatalf("FCALL with the cluster mode's key: %v", err)
	}
	if err := b.Subscribe(ctx, "sse:mine"); !errors.Is(err, ErrReservedChannel) {
		t.Fatalf("Subscribe(sse:mine) = %v, want ErrReservedChannel", err)
	}
}

// Resharding moves a channel's slot, with its history, to another master
// while its events are published: the old node drops the subscription, the
// broker subscribes the channel on its new master and reports the move as
// an outage (disconnect, then reconnect) so that the registry catches up,
// and ids keep increasing.
func TestShardedSlotMoves(t *testing.T) {
	skipShort(t)
	c := redistest.StartCluster(t, 3, 0)
	rec := newRecorder()
	m := newMetrics()
	b := newClusterBroker(t, c, true, rec, m.Metrics)
	ctx := ctxT(t)
	if err := b.EnsureHistory(ctx, keep); err != nil {
		t.Fatal(err)
	}
	const ch = "moving"
	if err := b.Subscribe(ctx, ch, "staying"); err != nil {
		t.Fatal(err)
	}
	cc := c.Client()
	var ids []uint64
	publish := func(i int) {
		t.Helper()
		id, err := cc.FCall(ctx, PublishFunction, []string{ShardedHistoryKey(ch)}, strconv.Itoa(i)).Uint64()
		if err != nil {
			t.Fatal(err)
		}
		if len(ids) > 0 && id <= ids[len(ids)-1] {
			t.Fatalf("id %d after %d", id, ids[len(ids)-1])
		}
		ids = append(ids, id)
	}
	for i := range 5 {
		publish(i)
	}
	rec.waitMessages(t, 5)
	from := c.MasterOf(ch)
	var to *redistest.Server
	for _, n := range c.Masters() {
		if n != from && n != c.MasterOf("staying") {
			to = n
		}
	}
	if to == nil {
		for _, n := range c.Masters() {
			if n != from {
				to = n
			}
		}
	}
	c.MoveSlot(ShardedHistoryKey(ch), to)
	for i := 5; i < 10; i++ {
		publish(i)
	}
	eventually(t, "the move reported as an outage", func() bool {
		return rec.disconnects.Load() >= 1 && rec.reconnects.Load() >= 1
	})
	eventually(t, "the subscription on the new master", func() bool {
		return shardSubscribers(t, c)[to] == 1 && shardSubscribers(t, c)[from] == 0 || from == c.MasterOf("staying")
	})
	// Live events reach the broker again from the new master.
	publish(10)
	eventually(t, "the event published after the move", func() bool {
		for _, m := range rec.messages() {
			if m.Seq == ids[10] {
				return true
			}
		}
		return false
	})
	// Everything is in history, in order, for the catch-up.
	rp, err := b.ReplayChannelsAll(ctx, []string{ch}, []uint64{0})
	if err != nil {
		t.Fatal(err)
	}
	if len(rp.Messages) != len(ids) {
		t.Fatalf("history holds %d events, want %d", len(rp.Messages), len(ids))
	}
	for i, msg := range rp.Messages {
		if msg.Seq != ids[i] {
			t.Fatalf("history %d: id %d, want %d", i, msg.Seq, ids[i])
		}
	}
	eventually(t, "connected", b.Connected)
	if m.connected() != 1 {
		t.Fatalf("connected gauge %v after the move", m.connected())
	}
}

// With a Handler that can hold channels apart, a move holds the moved
// channel only, and releases it once it is subscribed on its new master;
// the other channels are never held.
func TestShardedSlotMovesHoldTheMovedChannel(t *testing.T) {
	skipShort(t)
	c := redistest.StartCluster(t, 3, 0)
	rec := &channelRecorder{recorder: newRecorder()}
	b := newClusterBroker(t, c, true, rec, Metrics{})
	ctx := ctxT(t)
	if err := b.Subscribe(ctx, "moving", "staying"); err != nil {
		t.Fatal(err)
	}
	from := c.MasterOf("moving")
	var to *redistest.Server
	for _, n := range c.Masters() {
		if n != from {
			to = n
		}
	}
	if c.MasterOf("staying") == from {
		t.Log("both channels on one master: the other stays on it")
	}
	c.MoveSlot(ShardedHistoryKey("moving"), to)
	eventually(t, "the move held and released", func() bool {
		held, back := rec.outages()
		return len(held) > 0 && slices.Equal(held, back)
	})
	held, _ := rec.outages()
	for _, ch := range held {
		if ch != "moving" {
			t.Fatalf("held %q, want only the moved channel", held)
		}
	}
	if rec.disconnects.Load() != 0 || rec.reconnects.Load() != 0 {
		t.Fatalf("%d disconnects and %d reconnects: every channel held", rec.disconnects.Load(), rec.reconnects.Load())
	}
	eventually(t, "the subscription on the new master", func() bool { return shardSubscribers(t, c)[to] >= 1 })
}

// A master fails and its replica takes over: the broker moves the
// channels of the dead master to the new one, and events published there
// arrive.
func TestShardedFailover(t *testing.T) {
	skipShort(t)
	c := redistest.StartCluster(t, 3, 1)
	rec := &channelRecorder{recorder: newRecorder()}
	m := newMetrics()
	b := newClusterBroker(t, c, true, rec, m.Metrics)
	ctx := ctxT(t)
	if err := b.EnsureHistory(ctx, keep); err != nil {
		t.Fatal(err)
	}
	chans := channelsOnEveryMaster(t, c)
	if err := b.Subscribe(ctx, chans...); err != nil {
		t.Fatal(err)
	}
	victim := c.MasterOf(chans[0])
	if err := victim.Client().Do(ctx, "WAIT", 1, 5000).Err(); err != nil {
		t.Fatal(err)
	}
	victim.Stop()
	c.WaitOK()
	cc := c.Client()
	eventually(t, "connected again", func() bool { return b.Connected() && m.connected() == 1 })
	n := len(rec.messages())
	deadline := time.Now().Add(20 * time.Second)
	for i, ch := range chans {
		for {
			_, err := b.Publish(context.Background(), ch, []byte("after "+strconv.Itoa(i)), keep)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal(err)
			}
			cc.ReloadState(ctx)
			time.Sleep(50 * time.Millisecond)
		}
	}
	msgs := rec.waitMessages(t, n+len(chans))
	seen := map[string]bool{}
	for _, m := range msgs[n:] {
		seen[m.Channel] = true
	}
	for _, ch := range chans {
		if !seen[ch] {
			t.Fatalf("no event on %q after the failover", ch)
		}
	}
	if subs := shardSubscribers(t, c); len(subs) != 3 {
		t.Fatalf("shard subscription connections on %d nodes after the failover, want 3", len(subs))
	}
	// Only the dead master's channel was held, and every hold released.
	eventually(t, "every hold released", func() bool {
		held, back := rec.outages()
		return slices.Equal(held, back)
	})
	held, _ := rec.outages()
	if len(held) == 0 || slices.ContainsFunc(held, func(ch string) bool { return ch != chans[0] }) {
		t.Fatalf("held %q, want %q (of the dead master) only", held, chans[0])
	}
}

// skipShort skips a test that runs a Redis Cluster under go test -short.
func skipShort(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("runs a Redis Cluster")
	}
}

package broker

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/internal/redistest"
)

// newClusterBroker starts a broker on the cluster c, given its first node
// only, with shard channels if sharded.
func newClusterBroker(t *testing.T, c *redistest.Cluster, sharded bool, h Handler, m Metrics) *Broker {
	t.Helper()
	return startBroker(t, Options{
		Redis:       &redis.UniversalOptions{Addrs: c.Addrs()[:1]},
		Cluster:     true,
		Sharded:     sharded,
		Metrics:     m,
		HealthCheck: 200 * time.Millisecond,
		Probe:       200 * time.Millisecond,
	}, h)
}

// channelsOnEveryMaster returns one channel name per master.
func channelsOnEveryMaster(t *testing.T, c *redistest.Cluster) []string {
	t.Helper()
	seen := map[*redistest.Server]bool{}
	var out []string
	for i := 0; len(out) < len(c.Masters()) && i < 1000; i++ {
		ch := "ch" + strconv.Itoa(i)
		if m := c.MasterOf(ch); !seen[m] {
			seen[m] = true
			out = append(out, ch)
		}
	}
	return out
}

// Channels on every shard reach the one subscription connection, whether
// published with PUBLISH from any node or resumably with FCALL, which takes
// its ids from one counter so that they order every channel.
func TestClusterPublishAndHistory(t *testing.T) {
	c := redistest.StartCluster(t, 3, 0)
	rec := newRecorder()
	b := newClusterBroker(t, c, false, rec, Metrics{})
	ctx := ctxT(t)
	if err := b.EnsureHistory(ctx, keep); err != nil {
		t.Fatal(err)
	}
	chans := channelsOnEveryMaster(t, c)
	if err := b.Subscribe(ctx, chans...); err != nil {
		t.Fatal(err)
	}
	cc := c.Client()
	var want []string
	for i, ch := range chans {
		// PUBLISH on the node that serves the channel's slot, and on
		// another one: the cluster broadcasts both.
		for _, n := range []*redistest.Server{c.MasterOf(ch), c.Nodes[(i+1)%len(c.Nodes)]} {
			p := fmt.Sprintf("plain %s via %s", ch, n.Addr())
			if err := n.Client().Publish(ctx, ch, p).Err(); err != nil {
				t.Fatal(err)
			}
			want = append(want, p)
		}
	}
	var last uint64
	for i := range 30 {
		ch := chans[i%len(chans)]
		var id uint64
		var err error
		if i%2 == 0 {
			id, err = b.Publish(ctx, ch, []byte("r"+strconv.Itoa(i)), keep)
		} else {
			// The one-command form a backend uses in a cluster.
			id, err = cc.FCall(ctx, PublishFunction, []string{ClusterKeyPrefix + ch}, "r"+strconv.Itoa(i)).Uint64()
		}
		if err != nil {
			t.Fatal(err)
		}
		if id <= last {
			t.Fatalf("id %d after %d", id, last)
		}
		last = id
		want = append(want, "r"+strconv.Itoa(i))
	}
	msgs := rec.waitMessages(t, len(want))
	// PUBLISHes from different nodes reach us in no set order; resumable
	// events all come from the {sse} shard, in id order.
	got := map[string]bool{}
	var prev uint64
	for _, m := range msgs {
		got[string(m.Payload)] = true
		if m.Seq != 0 {
			if m.Seq <= prev {
				t.Fatalf("ids out of order: %d after %d", m.Seq, prev)
			}
			prev = m.Seq
		}
	}
	for _, w := range want {
		if !got[w] {
			t.Fatalf("%q not received; got %d messages", w, len(msgs))
		}
	}
	rp, err := b.Replay(ctx, chans, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(rp.Messages) != 30 {
		t.Fatalf("replayed %d, want 30", len(rp.Messages))
	}
	for i, m := range rp.Messages {
		if string(m.Payload) != "r"+strconv.Itoa(i) || m.Channel != chans[i%len(chans)] {
			t.Fatalf("replayed %d: %s %q", i, m.Channel, m.Payload)
		}
	}
	// The channel form is refused in a cluster with a message that says
	// what to do, rather than failing with a cross-slot error.
	err = cc.FCall(ctx, PublishFunction, []string{chans[0]}, "x").Err()
	if err == nil || !strings.Contains(err.Error(), "{sse}:h:") {
		t.Fatalf("FCALL with a bare channel in a cluster: %v", err)
	}
}

// A master fails and its replica takes over: the broker follows, and
// resumable events published after the failover are all in history.
func TestClusterFailover(t *testing.T) {
	c := redistest.StartCluster(t, 3, 1)
	rec := newRecorder()
	m := newMetrics()
	b := newClusterBroker(t, c, false, rec, m.Metrics)
	ctx := ctxT(t)
	if err := b.EnsureHistory(ctx, keep); err != nil {
		t.Fatal(err)
	}
	chans := channelsOnEveryMaster(t, c)
	if err := b.Subscribe(ctx, chans...); err != nil {
		t.Fatal(err)
	}
	before, err := b.Publish(ctx, chans[0], []byte("before"), keep)
	if err != nil {
		t.Fatal(err)
	}
	rec.waitMessages(t, 1)
	// Kill the node holding the subscription connection and the one
	// holding history (they may be the same).
	hist := c.MasterOf(ClusterSeqKey)
	if err := hist.Client().Do(ctx, "WAIT", 1, 5000).Err(); err != nil {
		t.Fatal(err)
	}
	sub := subscribedNode(t, c)
	if sub == nil {
		t.Fatal("no node has the subscription connection")
	}
	hist.Stop()
	c.WaitOK()
	if sub != hist && sub.IsMaster() {
		// One master at a time: the others must be a majority to elect.
		sub.Stop()
		c.WaitOK()
	}
	ctx = context.Background()
	cc := c.Client()
	var ids []uint64
	deadline := time.Now().Add(30 * time.Second)
	for i := 0; i < 20; {
		id, err := cc.FCall(ctx, PublishFunction, []string{ClusterKeyPrefix + chans[i%len(chans)]}, strconv.Itoa(i)).Uint64()
		if err != nil {
			// The client's view of the slots catches up.
			if time.Now().After(deadline) {
				t.Fatal(err)
			}
			time.Sleep(50 * time.Millisecond)
			continue
		}
		ids = append(ids, id)
		i++
	}
	eventually(t, "the reconnect", func() bool { return rec.reconnects.Load() >= 1 })
	rp, err := b.Replay(ctx, chans, before)
	if err != nil {
		t.Fatal(err)
	}
	if len(rp.Messages) != len(ids) {
		t.Fatalf("replay after %d: %d messages, want %d", before, len(rp.Messages), len(ids))
	}
	for i, msg := range rp.Messages {
		if msg.Seq != ids[i] {
			t.Fatalf("replayed %d: id %d, want %d", i, msg.Seq, ids[i])
		}
	}
	n := len(rec.messages())
	if err := cc.Publish(ctx, chans[1], "live").Err(); err != nil {
		t.Fatal(err)
	}
	if got := rec.waitMessages(t, n+1); string(got[len(got)-1].Payload) != "live" {
		t.Fatalf("last message %q, want live", got[len(got)-1].Payload)
	}
}

// subscribedNode is the node the broker's subscription connection is on,
// nil if none.
func subscribedNode(t *testing.T, c *redistest.Cluster) *redistest.Server {
	t.Helper()
	for _, n := range c.Nodes {
		list, err := n.Client().ClientList(context.Background()).Result()
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(list, "\n") {
			if strings.Contains(l, "sub=") && !strings.Contains(l, " sub=0 ") {
				return n
			}
		}
	}
	return nil
}

// Resharding moves the {sse} slot, with the history, to another master:
// that master already has the function library, so resumable publishing
// and replay go on, with ids still increasing.
func TestClusterHistorySlotMoves(t *testing.T) {
	c := redistest.StartCluster(t, 3, 0)
	rec := newRecorder()
	b := newClusterBroker(t, c, false, rec, Metrics{})
	ctx := context.Background()
	if err := b.EnsureHistory(ctx, keep); err != nil {
		t.Fatal(err)
	}
	if err := b.Subscribe(ctx, "moving"); err != nil {
		t.Fatal(err)
	}
	var ids []uint64
	publish := func(cc redis.Cmdable, i int) {
		t.Helper()
		id, err := cc.FCall(ctx, PublishFunction, []string{ClusterKeyPrefix + "moving"}, strconv.Itoa(i)).Uint64()
		if err != nil {
			t.Fatal(err)
		}
		if len(ids) > 0 && id <= ids[len(ids)-1] {
			t.Fatalf("id %d after %d", id, ids[len(ids)-1])
		}
		ids = append(ids, id)
	}
	cc := c.Client()
	for i := range 5 {
		publish(cc, i)
	}
	from := c.MasterOf(ClusterSeqKey)
	var to *redistest.Server
	for _, m := range c.Masters() {
		if m != from {
			to = m
			break
		}
	}
	c.MoveSlot(ClusterSeqKey, to)
	if c.MasterOf(ClusterSeqKey) != to {
		t.Fatal("the slot did not move")
	}
	// A client that knew the old layout follows the MOVED reply.
	for i := 5; i < 10; i++ {
		publish(cc, i)
	}
	if _, err := b.Publish(ctx, "moving", []byte("10"), keep); err != nil {
		t.Fatal(err)
	}
	msgs := rec.waitMessages(t, 11)
	for i, m := range msgs {
		if string(m.Payload) != strconv.Itoa(i) {
			t.Fatalf("message %d = %q; all: %+v", i, m.Payload, msgs)
		}
	}
	rp, err := b.Replay(ctx, []string{"moving"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(rp.Messages) != 11 || rp.Truncated {
		t.Fatalf("replayed %d (truncated %v), want 11", len(rp.Messages), rp.Truncated)
	}
	for i, id := range ids {
		if rp.Messages[i].Seq != id {
			t.Fatalf("replayed %d: id %d, want %d", i, rp.Messages[i].Seq, id)
		}
	}
	// The subscription follows the slot to its new master, and reports
	// the move as a reconnect so that the registry catches up.
	eventually(t, "the subscription on the new master", func() bool {
		return rec.reconnects.Load() >= 1 && subscribedNode(t, c) == to
	})
}

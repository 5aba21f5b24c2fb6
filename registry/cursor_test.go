package registry

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/caddy-sse/caddy-sse/sse"
)

// channelSource is a fakeSource whose ids count per channel: it answers
// Heads from heads and replays from history (per channel, in id order).
type channelSource struct {
	fakeSource
	mu      sync.Mutex
	heads   map[string]uint64
	history map[string][]Message
	replays [][]uint64 // the positions of each ReplayChannels call
}

func (c *channelSource) PerChannel() bool { return true }

func (c *channelSource) Heads(_ context.Context, channels []string) ([]uint64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]uint64, len(channels))
	for i, ch := range channels {
		out[i] = c.heads[ch]
	}
	return out, nil
}

func (c *channelSource) ReplayChannels(_ context.Context, channels []string, after []uint64, count int64) (Page, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.replays = append(c.replays, slices.Clone(after))
	var pg Page
	for i, ch := range channels {
		n := int64(0)
		for _, m := range c.history[ch] {
			if m.Seq > after[i] {
				if n == count {
					pg.More = true
					break
				}
				pg.Messages = append(pg.Messages, m)
				n++
			}
		}
	}
	return pg, nil
}

func (c *channelSource) ReplayChannelsAll(ctx context.Context, channels []string, after []uint64) ([]Message, bool, error) {
	pg, err := c.ReplayChannels(ctx, channels, after, 1<<30)
	return pg.Messages, false, err
}

func (c *channelSource) publish(m Message) {
	c.mu.Lock()
	c.history[m.Channel] = append(c.history[m.Channel], m)
	c.heads[m.Channel] = m.Seq
	c.mu.Unlock()
}

func newChannelSource() *channelSource {
	return &channelSource{heads: map[string]uint64{}, history: map[string][]Message{}}
}

// wire is what a stream writes for the frames queued on s, through cur.
func wire(cur *Cursor, s *Subscriber) string {
	frames, _ := s.Take(nil)
	bufs, _, _ := cur.AppendWire(nil, frames)
	var b strings.Builder
	for _, x := range bufs {
		b.Write(x)
	}
	return b.String()
}

func TestParseEventID(t *testing.T) {
	for _, tc := range []struct {
		in    string
		valid bool
	}{
		{"123", true}, {" 7 ", true}, {"0", true}, {"v1", true},
		{"v1.AAAA1", true}, {"v1.Ab-_zz.QQQQ0", true},
		{"", false}, {"-1", false}, {"abc", false}, {"v1.", false}, {"v1.AAA", false},
		{"v1.AAAA", false}, {"v1.A*AA1", false}, {"v1.AAAA1.", false}, {"v2.AAAA1", false},
		{"v1.AAAA+1", false}, {"v1.AAAA1\n", true}, {strings.Repeat("1", 5000), false},
		{"v1" + strings.Repeat(".AAAA1", 5000), true}, {"v1" + strings.Repeat(".AAAA1", 6000), false},
	} {
		if got := ParseEventID(tc.in).Valid(); got != tc.valid {
			t.Errorf("ParseEventID(%q).Valid() = %v, want %v", tc.in, got, tc.valid)
		}
	}
}

// With ids per channel, a stream on two channels gets events whose id
// line is its own vector, written after the shared frame's bytes, and it
// resumes from that vector on another instance: each channel from its own
// position, nothing twice.
func TestCursorVectorRoundTrip(t *testing.T) {
	src := newChannelSource()
	src.heads["a"], src.heads["b"] = 500, 7 // history before the stream
	r := newRegistry(t, src, Metrics{})
	s := NewSubscriber([]string{"a", "b"}, sse.FormatRaw, 16, true)
	attach(t, r, s)
	cur := r.Cursor(s, EventID{})
	if cur.Resuming() {
		t.Fatal("a stream without Last-Event-ID resumes")
	}
	first := "v1." + channelKey("a") + strconv.FormatUint(500, 36) + "." + channelKey("b") + "7"
	if cur.ID() != first {
		t.Fatalf("starting id %q, want %q", cur.ID(), first)
	}
	for _, m := range []Message{msg("a", 501), msg("b", 8), msg("a", 502)} {
		src.publish(m)
		r.Deliver(m)
	}
	// A plain message: no id line, the id does not move.
	r.Deliver(Message{Channel: "b", Payload: []byte("plain")})
	got := wire(cur, s)
	id1 := "v1." + channelKey("a") + "dx." + channelKey("b") + "7"
	id2 := "v1." + channelKey("a") + "dx." + channelKey("b") + "8"
	id3 := "v1." + channelKey("a") + "dy." + channelKey("b") + "8"
	want := "data: m501\nid: " + id1 + "\n\n" +
		"data: m8\nid: " + id2 + "\n\n" +
		"data: m502\nid: " + id3 + "\n\n" +
		"data: plain\n\n"
	if got != want {
		t.Fatalf("wire:\n%q\nwant\n%q", got, want)
	}

	// Resume from the second event's id: b is up to date, a missed 502.
	for _, m := range []Message{msg("b", 9), msg("a", 503)} {
		src.publish(m)
		r.Deliver(m)
	}
	s2 := NewSubscriber([]string{"b", "a"}, sse.FormatRaw, 16, true)
	s2.Replaying()
	attach(t, r, s2)
	cur2 := r.Cursor(s2, ParseEventID(id2))
	if !cur2.Resuming() {
		t.Fatal("a stream with a vector Last-Event-ID does not resume")
	}
	pg, err := r.ReplayPage(context.Background(), cur2, 100)
	if err != nil {
		t.Fatal(err)
	}
	last := src.replays[len(src.replays)-1]
	if !slices.Equal(last, []uint64{8, 501}) {
		t.Fatalf("replayed from %v, want b after 8 and a after 501", last)
	}
	var frames []*Frame
	for _, m := range pg.Messages {
		frames = append(frames, r.Encode(sse.FormatRaw, true, m))
	}
	// A live event that the replay holds too arrives meanwhile.
	src.publish(msg("a", 504))
	r.Deliver(msg("a", 504))
	live, _ := s2.Take(nil)
	bufs, n, _ := cur2.AppendWire(nil, append(frames, live...))
	var b strings.Builder
	for _, x := range bufs {
		b.Write(x)
	}
	if n != 4 {
		t.Fatalf("wrote %d events, want 4 (a 502, b 9, a 503, a 504):\n%s", n, b.String())
	}
	for _, d := range []string{"m502", "m9", "m503", "m504"} {
		if strings.Count(b.String(), "data: "+d+"\n") != 1 {
			t.Fatalf("replay + live wrote %q not once:\n%s", d, b.String())
		}
	}
	want2 := "v1." + channelKey("b") + "9." + channelKey("a") + strconv.FormatUint(504, 36)
	if cur2.ID() != want2 {
		t.Fatalf("id after resume %q, want %q", cur2.ID(), want2)
	}
}

// A stream on one channel keeps a plain number, and a plain number resumes
// every channel of a stream from it (0: everything retained).
func TestCursorPlainNumber(t *testing.T) {
	src := newChannelSource()
	r := newRegistry(t, src, Metrics{})
	for _, m := range []Message{msg("solo", 3), msg("x", 4), msg("y", 5)} {
		src.publish(m)
	}
	s := NewSubscriber([]string{"solo"}, sse.FormatRaw, 8, true)
	attach(t, r, s)
	cur := r.Cursor(s, EventID{})
	r.Deliver(msg("solo", 10))
	if got := wire(cur, s); got != "data: m10\nid: 10\n\n" {
		t.Fatalf("single channel wire %q", got)
	}
	s2 := NewSubscriber([]string{"x", "y"}, sse.FormatRaw, 8, true)
	attach(t, r, s2)
	cur2 := r.Cursor(s2, ParseEventID("0"))
	pg, err := r.ReplayPage(context.Background(), cur2, 10)
	if err != nil || len(pg.Messages) != 2 {
		t.Fatalf("replay from 0: %d messages, %v; want both channels' history", len(pg.Messages), err)
	}
}

// A vector id stays within the documented bound.
func TestVectorIDLength(t *testing.T) {
	src := newChannelSource()
	r := newRegistry(t, src, Metrics{})
	var chans []string
	for i := range 16 {
		chans = append(chans, fmt.Sprintf("room:%d", i))
	}
	s := NewSubscriber(chans, sse.FormatRaw, 64, true)
	attach(t, r, s)
	cur := r.Cursor(s, EventID{})
	now := uint64(1_800_000_000_000_000) // microseconds, in 2027
	for i, ch := range chans {
		r.Deliver(msg(ch, now+uint64(i)))
	}
	wire(cur, s)
	if n := len(cur.ID()); n > 2+15*16 {
		t.Fatalf("16-channel id of %d bytes, want at most %d: %s", n, 2+15*16, cur.ID())
	}
	for i, ch := range chans {
		r.Deliver(msg(ch, ^uint64(0)-uint64(16-i)))
	}
	wire(cur, s)
	if n := len(cur.ID()); n > 2+18*16 {
		t.Fatalf("16-channel id of %d bytes at the largest ids, want at most %d", n, 2+18*16)
	}
}

// Two channels whose keys collide are told apart by their order.
func TestVectorKeyCollision(t *testing.T) {
	seen := map[string]string{}
	var a, b string
	for i := 0; a == ""; i++ {
		ch := "c" + strconv.Itoa(i)
		k := channelKey(ch)
		if o, ok := seen[k]; ok {
			a, b = o, ch
		}
		seen[k] = ch
	}
	src := newChannelSource()
	r := newRegistry(t, src, Metrics{})
	s := NewSubscriber([]string{a, b}, sse.FormatRaw, 8, true)
	attach(t, r, s)
	cur := r.Cursor(s, EventID{})
	r.Deliver(msg(a, 11))
	r.Deliver(msg(b, 22))
	wire(cur, s)
	s2 := NewSubscriber([]string{a, b}, sse.FormatRaw, 8, true)
	attach(t, r, s2)
	cur2 := r.Cursor(s2, ParseEventID(cur.ID()))
	if chs, after := cur2.replayFrom(); !slices.Equal(chs, []string{a, b}) || !slices.Equal(after, []uint64{11, 22}) {
		t.Fatalf("%s and %s (key %s) resume from %v %v, want 11 and 22", a, b, channelKey(a), chs, after)
	}
}

// After a reconnect each resumable channel is caught up from its own
// position; what arrived live meanwhile follows, without duplicates.
func TestPerChannelCatchUp(t *testing.T) {
	src := newChannelSource()
	src.heads["a"], src.heads["b"] = 100, 5
	r := newRegistry(t, src, Metrics{})
	s := NewSubscriber([]string{"a", "b"}, sse.FormatRaw, 64, true)
	attach(t, r, s)
	cur := r.Cursor(s, EventID{})
	r.Disconnected()
	// Published during the outage: in history only. Then live again,
	// overlapping what the catch-up reads.
	for _, m := range []Message{msg("a", 101), msg("b", 6), msg("a", 102)} {
		src.publish(m)
	}
	r.Deliver(msg("a", 102))
	src.publish(msg("b", 7))
	r.Deliver(msg("b", 7))
	r.Reconnected(context.Background())
	frames, _ := s.Take(nil)
	bufs, n, _ := cur.AppendWire(nil, frames)
	var b strings.Builder
	for _, x := range bufs {
		b.Write(x)
	}
	if n != 4 {
		t.Fatalf("caught up %d events, want 4:\n%s", n, b.String())
	}
	for _, d := range []string{"m101", "m6", "m102", "m7"} {
		if strings.Count(b.String(), "data: "+d+"\n") != 1 {
			t.Fatalf("%s not written once:\n%s", d, b.String())
		}
	}
	if strings.Index(b.String(), "m101") > strings.Index(b.String(), "m102") {
		t.Fatalf("a's events out of order:\n%s", b.String())
	}
}

// A hold of some channels (their shard is failing over, or they move to
// another shard) holds their live messages only: the other channels go on,
// and the held ones are caught up from their heads when the last hold is
// released, without duplicates.
func TestHoldChannels(t *testing.T) {
	src := newChannelSource()
	src.heads["a"], src.heads["b"] = 100, 5
	r := newRegistry(t, src, Metrics{})
	s := NewSubscriber([]string{"a", "b"}, sse.FormatRaw, 64, true)
	attach(t, r, s)
	cur := r.Cursor(s, EventID{})
	r.HoldChannels([]string{"a"})
	r.HoldChannels([]string{"a"}) // a failover and a move at once
	src.publish(msg("a", 101))    // published while a's shard was out
	src.publish(msg("a", 102))
	r.Deliver(msg("a", 102))
	src.publish(msg("b", 6))
	r.Deliver(msg("b", 6))
	if got := wire(cur, s); got != "data: m6\nid: "+cur.ID()+"\n\n" {
		t.Fatalf("while a is held, b's event: %q", got)
	}
	r.ReleaseChannels(context.Background(), []string{"a"})
	if got := wire(cur, s); got != "" {
		t.Fatalf("a released once of twice delivered %q", got)
	}
	src.publish(msg("a", 103))
	r.Deliver(msg("a", 103))
	r.ReleaseChannels(context.Background(), []string{"a"})
	frames, _ := s.Take(nil)
	bufs, n, _ := cur.AppendWire(nil, frames)
	var b strings.Builder
	for _, x := range bufs {
		b.Write(x)
	}
	if n != 3 || !strings.Contains(b.String(), "m101\n") || strings.Index(b.String(), "m102") > strings.Index(b.String(), "m103") {
		t.Fatalf("a released: %d events, want 101, 102, 103 once each in order:\n%s", n, b.String())
	}
	// Live again.
	r.Deliver(msg("a", 104))
	if got := wire(cur, s); !strings.HasPrefix(got, "data: m104\n") {
		t.Fatalf("after the release: %q", got)
	}
}

package broker

import (
	"bytes"
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/internal/redistest"
)

var keep = Retention{MaxLen: 100, TTL: time.Hour}

// Publish with retention returns increasing ids, and the live message
// carries the id and the payload exactly as published.
func TestPublishHistoryLive(t *testing.T) {
	srv := redistest.Start(t)
	rec := newRecorder()
	b := newBroker(t, srv, rec, Metrics{})
	ctx := ctxT(t)
	if err := b.EnsureHistory(ctx, keep); err != nil {
		t.Fatal(err)
	}
	if err := b.Subscribe(ctx, "h"); err != nil {
		t.Fatal(err)
	}
	binary := make([]byte, 256)
	for i := range binary {
		binary[i] = byte(i)
	}
	payloads := [][]byte{
		[]byte("plain"),
		{},
		[]byte("line1\r\nline2\nline3\rline4"),
		binary,
		[]byte("\x1esse:not-a-frame\x1e"), // looks like framing: must come back untouched
		bytes.Repeat([]byte("large "), 200_000),
	}
	var last uint64
	seqs := make([]uint64, len(payloads))
	for i, p := range payloads {
		seq, err := b.Publish(ctx, "h", p, keep)
		if err != nil {
			t.Fatal(err)
		}
		if seq <= last {
			t.Fatalf("publish %d: id %d after %d, want increasing", i, seq, last)
		}
		last, seqs[i] = seq, seq
	}
	msgs := rec.waitMessages(t, len(payloads))
	for i, m := range msgs {
		if m.Seq != seqs[i] || !bytes.Equal(m.Payload, payloads[i]) {
			t.Fatalf("message %d: seq %d payload %q (len %d), want seq %d payload of len %d",
				i, m.Seq, trunc(m.Payload), len(m.Payload), seqs[i], len(payloads[i]))
		}
	}
	// And the ids are what history holds.
	rp, err := b.Replay(ctx, []string{"h"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(rp.Messages) != len(payloads) || rp.Truncated {
		t.Fatalf("replay: %d messages, truncated %v", len(rp.Messages), rp.Truncated)
	}
	for i, m := range rp.Messages {
		if m.Seq != seqs[i] || !bytes.Equal(m.Payload, payloads[i]) || m.Channel != "h" {
			t.Fatalf("replayed %d: %s seq %d %q", i, m.Channel, m.Seq, trunc(m.Payload))
		}
	}
}

// A plain PUBLISH (Retention zero) keeps its payload and has no id, even
// when it looks like a frame.
func TestPublishPlain(t *testing.T) {
	srv := redistest.Start(t)
	rec := newRecorder()
	b := newBroker(t, srv, rec, Metrics{})
	ctx := ctxT(t)
	if err := b.Subscribe(ctx, "p"); err != nil {
		t.Fatal(err)
	}
	payloads := []string{"x", "\x1esse:12\x1ebody", "\x1esse:x\x1ey", "\x1esse:12"}
	for _, p := range payloads[:1] {
		seq, err := b.Publish(ctx, "p", []byte(p), Retention{})
		if err != nil || seq != 0 {
			t.Fatalf("Publish = %d, %v; want 0, nil", seq, err)
		}
	}
	for _, p := range payloads[1:] {
		if err := srv.Client().Publish(ctx, "p", p).Err(); err != nil {
			t.Fatal(err)
		}
	}
	msgs := rec.waitMessages(t, len(payloads))
	want := []Message{
		{Channel: "p", Payload: []byte("x")},
		{Channel: "p", Payload: []byte("\x1esse:12\x1ebody")}, // only sse_publish sets an id
		{Channel: "p", Payload: []byte("\x1esse:x\x1ey")},
		{Channel: "p", Payload: []byte("\x1esse:12")},
	}
	for i := range want {
		if msgs[i].Seq != want[i].Seq || !bytes.Equal(msgs[i].Payload, want[i].Payload) {
			t.Fatalf("message %d = %+v, want %+v", i, msgs[i], want[i])
		}
	}
	if n := srv.Client().Exists(ctx, HistoryKeyPrefix+"p").Val(); n != 0 {
		t.Fatal("a plain publish wrote history")
	}
}

func TestUnframe(t *testing.T) {
	for _, tc := range []struct {
		in   string
		seq  uint64
		body string
		ok   bool
	}{
		{"\x1esse:1\x1e", 1, "", true},
		{"\x1esse:1712345678901234\x1ehello", 1712345678901234, "hello", true},
		{"\x1esse:18446744073709551615\x1e\x1e", 18446744073709551615, "\x1e", true},
		{"\x1esse:18446744073709551616\x1ex", 0, "", false}, // overflows
		{"\x1esse:0\x1ex", 0, "", false},
		{"\x1esse:\x1ex", 0, "", false},
		{"\x1esse:+1\x1ex", 0, "", false},
		{"\x1esse:1 \x1ex", 0, "", false},
		{"\x1esse:12", 0, "", false},
		{"\x1esse12\x1ex", 0, "", false},
		{"sse:12\x1ex", 0, "", false},
		{"", 0, "", false},
	} {
		seq, body, ok := unframe(tc.in)
		if seq != tc.seq || body != tc.body || ok != tc.ok {
			t.Errorf("unframe(%q) = %d, %q, %v; want %d, %q, %v", tc.in, seq, body, ok, tc.seq, tc.body, tc.ok)
		}
	}
}

// Replay after an id returns exactly the later events of every channel,
// merged in id order.
func TestReplayMerged(t *testing.T) {
	srv := redistest.Start(t)
	b := newBroker(t, srv, newRecorder(), Metrics{})
	ctx := ctxT(t)
	type ev struct {
		ch  string
		seq uint64
		p   string
	}
	var all []ev
	for i := range 20 {
		ch := "left"
		if i%3 == 0 {
			ch = "right"
		}
		p := ch + strconv.Itoa(i)
		seq, err := b.Publish(ctx, ch, []byte(p), keep)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, ev{ch, seq, p})
	}
	// Another channel's events are not wanted.
	if _, err := b.Publish(ctx, "other", []byte("o"), keep); err != nil {
		t.Fatal(err)
	}
	for _, k := range []int{0, 1, 7, 19} {
		after := all[k].seq
		rp, err := b.Replay(ctx, []string{"left", "right", "left", "missing"}, after)
		if err != nil {
			t.Fatal(err)
		}
		want := all[k+1:]
		if len(rp.Messages) != len(want) || rp.Truncated {
			t.Fatalf("after #%d: %d messages (truncated %v), want %d", k, len(rp.Messages), rp.Truncated, len(want))
		}
		for i, m := range rp.Messages {
			if m.Channel != want[i].ch || m.Seq != want[i].seq || string(m.Payload) != want[i].p {
				t.Fatalf("after #%d: message %d = %s %d %q, want %+v", k, i, m.Channel, m.Seq, m.Payload, want[i])
			}
		}
	}
	rp, err := b.Replay(ctx, []string{"missing"}, 0)
	if err != nil || len(rp.Messages) != 0 || rp.Truncated {
		t.Fatalf("replay of a channel without history = %+v, %v", rp, err)
	}
}

// With 10 kept of 100 published, a client whose last id is the newest
// trimmed event missed nothing; one id older, it missed one.
func TestReplayTruncated(t *testing.T) {
	srv := redistest.Start(t)
	b := newBroker(t, srv, newRecorder(), Metrics{})
	ctx := ctxT(t)
	small := Retention{MaxLen: 10}
	var seqs []uint64
	for i := range 100 {
		// Interleave another channel so that ids of "t" are not contiguous.
		if _, err := b.Publish(ctx, "noise", []byte("n"), small); err != nil {
			t.Fatal(err)
		}
		seq, err := b.Publish(ctx, "t", []byte(strconv.Itoa(i)), small)
		if err != nil {
			t.Fatal(err)
		}
		seqs = append(seqs, seq)
	}
	if n := srv.Client().XLen(ctx, HistoryKeyPrefix+"t").Val(); n != 10 {
		t.Fatalf("history holds %d entries, want 10", n)
	}
	for _, tc := range []struct {
		after     uint64
		n         int
		truncated bool
	}{
		{0, 10, true},
		{seqs[10], 10, true},
		{seqs[88], 10, true},      // #89 is gone
		{seqs[89], 10, false},     // the newest trimmed: nothing missed
		{seqs[89] + 1, 10, false}, // a "noise" id in between
		{seqs[95], 4, false},
		{seqs[99], 0, false},
	} {
		rp, err := b.Replay(ctx, []string{"t"}, tc.after)
		if err != nil {
			t.Fatal(err)
		}
		if len(rp.Messages) != tc.n || rp.Truncated != tc.truncated {
			t.Errorf("Replay after %d: %d messages, truncated %v; want %d, %v", tc.after, len(rp.Messages), rp.Truncated, tc.n, tc.truncated)
		}
	}
}

// FLUSHALL (or a restart without persistence) loses the history and the
// counter: a client resuming from an id before the loss cannot be shown
// that it missed nothing, so the replay says it may have.
func TestReplayAfterFlushAll(t *testing.T) {
	srv := redistest.Start(t)
	b := newBroker(t, srv, newRecorder(), Metrics{})
	ctx := ctxT(t)
	c := srv.Client()
	var ids []uint64
	publish := func(p string) {
		t.Helper()
		seq, err := b.Publish(ctx, "f", []byte(p), keep)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, seq)
	}
	replay := func(after uint64, n int, truncated bool) {
		t.Helper()
		rp, err := b.Replay(ctx, []string{"f"}, after)
		if err != nil {
			t.Fatal(err)
		}
		if len(rp.Messages) != n || rp.Truncated != truncated {
			t.Fatalf("Replay after %d: %d messages, truncated %v; want %d, %v", after, len(rp.Messages), rp.Truncated, n, truncated)
		}
	}
	for _, p := range []string{"1", "2", "3"} {
		publish(p)
	}
	replay(ids[1], 1, false)
	if err := c.FlushAll(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	// Nothing published since: everything is gone, the counter too.
	replay(ids[2], 0, true)
	replay(0, 0, false)
	publish("4")
	replay(ids[1], 1, true)
	replay(ids[2], 1, true)
	replay(ids[3], 0, false) // resumes from after the loss: nothing missed
	replay(0, 1, false)      // "everything retained" claims nothing

	// A library upgraded in place (counter, no epoch) claims nothing.
	if err := c.Del(ctx, EpochKey).Err(); err != nil {
		t.Fatal(err)
	}
	publish("5")
	if v := c.Get(ctx, EpochKey).Val(); v != "1" {
		t.Fatalf("epoch after an upgrade = %q, want 1", v)
	}
	replay(ids[3], 1, false)
}

// Paging through several interleaved channels returns every message once,
// in id order, each page bounded by count per channel.
func TestReplayPageInterleaved(t *testing.T) {
	srv := redistest.Start(t)
	b := newBroker(t, srv, newRecorder(), Metrics{})
	ctx := ctxT(t)
	chans := []string{"a", "b", "c"}
	type ev struct {
		ch  string
		seq uint64
	}
	var all []ev
	for i := range 40 {
		// Runs of one channel and gaps, so that pages end on different
		// channels.
		ch := chans[0]
		switch {
		case i%11 < 4:
			ch = chans[1]
		case i%5 == 0 || i > 30:
			ch = chans[2]
		}
		seq, err := b.Publish(ctx, ch, []byte(strconv.Itoa(i)), keep)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, ev{ch, seq})
	}
	for _, count := range []int64{1, 2, 3, 7, 100} {
		for _, start := range []int{-1, 0, 12, 38, 39} {
			var after uint64
			if start >= 0 {
				after = all[start].seq
			}
			want := all[start+1:]
			var got []Message
			pages := 0
			for {
				pg, err := b.ReplayPage(ctx, chans, after, count)
				if err != nil {
					t.Fatal(err)
				}
				pages++
				if pg.Truncated {
					t.Fatalf("count %d: page %d truncated", count, pages)
				}
				if n := int64(len(pg.Messages)); n > count*int64(len(chans)) {
					t.Fatalf("count %d: a page of %d messages, want at most %d", count, n, count*int64(len(chans)))
				}
				for _, m := range pg.Messages {
					if m.Seq <= after || m.Seq > pg.Next {
						t.Fatalf("count %d: message %d outside (%d, %d]", count, m.Seq, after, pg.Next)
					}
				}
				got = append(got, pg.Messages...)
				if !pg.More {
					break
				}
				if pg.Next <= after {
					t.Fatalf("count %d: Next %d after %d: no progress", count, pg.Next, after)
				}
				after = pg.Next
				if pages > 100 {
					t.Fatal("too many pages")
				}
			}
			if len(got) != len(want) {
				t.Fatalf("count %d from #%d: %d messages in %d pages, want %d", count, start, len(got), pages, len(want))
			}
			for i, m := range got {
				if m.Channel != want[i].ch || m.Seq != want[i].seq || string(m.Payload) != strconv.Itoa(start+1+i) {
					t.Fatalf("count %d from #%d: message %d = %s %d %q, want %s %d", count, start, i, m.Channel, m.Seq, m.Payload, want[i].ch, want[i].seq)
				}
			}
			if count == 3 && len(want) > 9 && pages < len(want)/9 {
				t.Fatalf("count 3: %d messages in %d pages", len(want), pages)
			}
		}
	}
}

// A trim between two pages shows in the next one.
func TestReplayPageTruncated(t *testing.T) {
	srv := redistest.Start(t)
	b := newBroker(t, srv, newRecorder(), Metrics{})
	ctx := ctxT(t)
	small := Retention{MaxLen: 5}
	var ids []uint64
	for i := range 5 {
		seq, err := b.Publish(ctx, "t", []byte(strconv.Itoa(i)), small)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, seq)
	}
	pg, err := b.ReplayPage(ctx, []string{"t"}, 0, 2)
	if err != nil || pg.Truncated || !pg.More || len(pg.Messages) != 2 || pg.Next != ids[1] {
		t.Fatalf("first page = %+v, %v; want 2 messages up to %d, more", pg, err, ids[1])
	}
	for i := 5; i < 8; i++ { // trims #0..#2: #2 was not read yet
		if _, err := b.Publish(ctx, "t", []byte(strconv.Itoa(i)), small); err != nil {
			t.Fatal(err)
		}
	}
	pg, err = b.ReplayPage(ctx, []string{"t"}, pg.Next, 2)
	if err != nil || !pg.Truncated || len(pg.Messages) != 2 || string(pg.Messages[0].Payload) != "3" {
		t.Fatalf("page after a trim = %+v, %v; want truncated, from #3", pg, err)
	}
}

// The one-command path: any Redis client publishes a resumable event with
// FCALL, using the defaults baked in by EnsureHistory.
func TestRawFCall(t *testing.T) {
	srv := redistest.Start(t)
	rec := newRecorder()
	b := newBroker(t, srv, rec, Metrics{})
	ctx := ctxT(t)
	if err := b.EnsureHistory(ctx, Retention{MaxLen: 5, TTL: time.Minute}); err != nil {
		t.Fatal(err)
	}
	// A larger retention from another config raises the defaults.
	if err := b.EnsureHistory(ctx, Retention{MaxLen: 50, TTL: 90 * time.Second}); err != nil {
		t.Fatal(err)
	}
	if err := b.EnsureHistory(ctx, Retention{MaxLen: 20, TTL: time.Second}); err != nil {
		t.Fatal(err)
	}
	if err := b.Subscribe(ctx, "raw"); err != nil {
		t.Fatal(err)
	}
	c := srv.Client()
	var last int64
	for i := range 60 {
		seq, err := c.Do(ctx, "FCALL", "sse_publish", 1, "raw", "payload "+strconv.Itoa(i)).Int64()
		if err != nil {
			t.Fatal(err)
		}
		if seq <= last {
			t.Fatalf("FCALL returned %d after %d", seq, last)
		}
		last = seq
	}
	msgs := rec.waitMessages(t, 60)
	if m := msgs[59]; m.Seq != uint64(last) || string(m.Payload) != "payload 59" {
		t.Fatalf("live message = %d %q, want %d %q", m.Seq, m.Payload, last, "payload 59")
	}
	key := HistoryKeyPrefix + "raw"
	if n := c.XLen(ctx, key).Val(); n != 50 {
		t.Fatalf("default maxlen kept %d entries, want 50", n)
	}
	if ttl := c.TTL(ctx, key).Val(); ttl <= time.Minute || ttl > 90*time.Second {
		t.Fatalf("default ttl = %s, want 90s", ttl)
	}
	// Explicit arguments win over the defaults; bad ones are refused.
	if err := c.Do(ctx, "FCALL", "sse_publish", 1, "raw", "x", 3, 0).Err(); err != nil {
		t.Fatal(err)
	}
	if n := c.XLen(ctx, key).Val(); n != 3 {
		t.Fatalf("maxlen 3 kept %d entries", n)
	}
	for _, args := range [][]any{{"x", 0}, {"x", "ten"}, {"x", 5, -1}, {}} {
		cmd := append([]any{"FCALL", "sse_publish", 1, "raw"}, args...)
		if err := c.Do(ctx, cmd...).Err(); err == nil || !strings.Contains(err.Error(), "sse_publish") && !strings.Contains(err.Error(), "usage") {
			t.Errorf("FCALL %v = %v, want an error", args, err)
		}
	}
}

// A Redis restart without persistence loses the function library and the
// counter: the broker reloads the library when it reconnects, EnsureHistory
// and Publish load it again if needed, and ids keep increasing.
func TestHistoryAfterRestart(t *testing.T) {
	srv := redistest.Start(t)
	rec := newRecorder()
	b := newBroker(t, srv, rec, Metrics{})
	ctx := ctxT(t)
	if err := b.EnsureHistory(ctx, keep); err != nil {
		t.Fatal(err)
	}
	before, err := b.Publish(ctx, "r", []byte("before"), keep)
	if err != nil {
		t.Fatal(err)
	}
	c := srv.Client()

	srv.Restart()
	// Nothing but the broker's reconnect can load the library again here:
	// it does so before calling HandleReconnect.
	eventually(t, "HandleReconnect", func() bool { return rec.reconnects.Load() == 1 })
	after, err := c.Do(ctx, "FCALL", "sse_publish", 1, "r", "after").Int64()
	if err != nil {
		t.Fatal(err)
	}
	if uint64(after) <= before {
		t.Fatalf("id after restart %d <= id before %d", after, before)
	}

	// EnsureHistory brings it back explicitly...
	if err := c.FunctionFlush(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	if err := b.EnsureHistory(ctx, keep); err != nil {
		t.Fatal(err)
	}
	if err := c.Do(ctx, "FCALL", "sse_publish", 1, "r", "y").Err(); err != nil {
		t.Fatalf("FCALL after EnsureHistory: %v", err)
	}
	// ...and Publish on its own.
	if err := c.FunctionFlush(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Publish(ctx, "r", []byte("z"), keep); err != nil {
		t.Fatalf("Publish after the library was lost: %v", err)
	}
}

func TestEnsureHistoryInvalid(t *testing.T) {
	srv := redistest.Start(t)
	b := newBroker(t, srv, newRecorder(), Metrics{})
	ctx := ctxT(t)
	if err := b.EnsureHistory(ctx, Retention{MaxLen: -1}); err == nil {
		t.Fatal("negative MaxLen accepted")
	}
	if err := b.EnsureHistory(ctx, Retention{MaxLen: 1, TTL: -time.Second}); err == nil {
		t.Fatal("negative TTL accepted")
	}
	if _, err := b.Publish(ctx, "c", nil, Retention{MaxLen: -1}); err == nil || !strings.Contains(err.Error(), `"c"`) {
		t.Fatalf("Publish with negative MaxLen = %v, want an error naming the channel", err)
	}
	if err := b.EnsureHistory(ctx, Retention{}); err != nil {
		t.Fatalf("EnsureHistory without history = %v", err)
	}
	if n := srv.Client().FunctionList(ctx, redis.FunctionListQuery{}).Val(); len(n) != 0 {
		t.Fatal("EnsureHistory without history loaded the library")
	}
}

func TestRetentionMerge(t *testing.T) {
	for _, tc := range []struct{ a, b, want Retention }{
		{Retention{10, time.Minute}, Retention{5, time.Hour}, Retention{10, time.Hour}},
		{Retention{10, 0}, Retention{50, time.Hour}, Retention{50, 0}},
		{Retention{10, time.Hour}, Retention{5, 0}, Retention{10, 0}},
	} {
		if got := tc.a.merge(tc.b); got != tc.want {
			t.Errorf("%+v.merge(%+v) = %+v, want %+v", tc.a, tc.b, got, tc.want)
		}
	}
	if ttlSeconds(1500*time.Millisecond) != 2 || ttlSeconds(time.Millisecond) != 1 || ttlSeconds(0) != 0 {
		t.Error("ttlSeconds does not round up to whole seconds")
	}
}

func trunc(p []byte) []byte {
	if len(p) > 40 {
		return p[:40]
	}
	return p
}

func BenchmarkPublishPlain(b *testing.B) {
	br, ctx := benchBroker(b)
	payload := []byte(`{"text":"hello"}`)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := br.Publish(ctx, "bench", payload, Retention{}); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkPublishHistory(b *testing.B) {
	br, ctx := benchBroker(b)
	payload := []byte(`{"text":"hello"}`)
	r := Retention{MaxLen: 1000, TTL: time.Hour}
	if err := br.EnsureHistory(ctx, r); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := br.Publish(ctx, "bench", payload, r); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReplay1000 replays 1,000 events spread over 5 channels.
func BenchmarkReplay1000(b *testing.B) {
	br, ctx, chans, first := benchHistory(b, 100)
	b.ReportAllocs()
	for b.Loop() {
		rp, err := br.Replay(ctx, chans, first)
		if err != nil {
			b.Fatal(err)
		}
		if len(rp.Messages) != 1000 {
			b.Fatalf("%d messages", len(rp.Messages))
		}
	}
}

// BenchmarkReplayPaged pages through 1,000 events of 10 KB on 5 channels,
// 32 per channel per page: what is held at once is one page, bounded by
// the page size and not the history (compare msgs/page and payload-B/page
// with BenchmarkReplayWhole; B/op counts every page, not what is held).
func BenchmarkReplayPaged(b *testing.B) {
	br, ctx, chans, first := benchHistory(b, 10_000)
	b.ReportAllocs()
	for b.Loop() {
		after, n, largest, held := first, 0, 0, 0
		for {
			pg, err := br.ReplayPage(ctx, chans, after, 32)
			if err != nil {
				b.Fatal(err)
			}
			n += len(pg.Messages)
			largest = max(largest, len(pg.Messages))
			held = max(held, payloadBytes(pg.Messages))
			if !pg.More {
				break
			}
			after = pg.Next
		}
		if n != 1000 || largest > 32*len(chans) {
			b.Fatalf("%d messages, largest page %d", n, largest)
		}
		b.ReportMetric(float64(largest), "msgs/page")
		b.ReportMetric(float64(held), "payload-B/page")
	}
}

func BenchmarkReplayWhole(b *testing.B) {
	br, ctx, chans, first := benchHistory(b, 10_000)
	b.ReportAllocs()
	for b.Loop() {
		rp, err := br.Replay(ctx, chans, first)
		if err != nil {
			b.Fatal(err)
		}
		if len(rp.Messages) != 1000 {
			b.Fatalf("%d messages", len(rp.Messages))
		}
		b.ReportMetric(float64(len(rp.Messages)), "msgs/page")
		b.ReportMetric(float64(payloadBytes(rp.Messages)), "payload-B/page")
	}
}

func payloadBytes(ms []Message) int {
	n := 0
	for _, m := range ms {
		n += len(m.Payload)
	}
	return n
}

// benchHistory publishes 1,001 events of size bytes over 5 channels and
// returns the id of the first.
func benchHistory(b *testing.B, size int) (*Broker, context.Context, []string, uint64) {
	br, ctx := benchBroker(b)
	r := Retention{MaxLen: 1000}
	chans := []string{"c0", "c1", "c2", "c3", "c4"}
	payload := bytes.Repeat([]byte("x"), size)
	var first uint64
	for i := range 1001 {
		seq, err := br.Publish(ctx, chans[i%len(chans)], payload, r)
		if err != nil {
			b.Fatal(err)
		}
		if i == 0 {
			first = seq
		}
	}
	return br, ctx, chans, first
}

func benchBroker(b *testing.B) (*Broker, context.Context) {
	srv := redistest.Start(b)
	br := newBrokerLog(b, srv, newRecorder(), Metrics{}, nil)
	return br, context.Background()
}

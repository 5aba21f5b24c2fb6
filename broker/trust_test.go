package broker

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-sse/caddy-sse/internal/redistest"
)

func newRejected() *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{Name: "rejected"}, []string{"reason"})
}

// Whatever bytes a plain PUBLISH carries, they reach the handler as plain
// data: never a Message with an id, whatever they look like. Only the
// module's resumable publish sets an id. A payload that looks like a
// forged frame is counted and logged once, not once per message.
func TestPlainPublishNeverResumable(t *testing.T) {
	srv := redistest.Start(t)
	rec := newRecorder()
	m := newMetrics()
	m.Rejected = newRejected()
	core, logs := observer.New(zap.DebugLevel)
	b := newBrokerLog(t, srv, rec, m.Metrics, zap.New(core))
	ctx := ctxT(t)
	if err := b.Subscribe(ctx, "user:42"); err != nil {
		t.Fatal(err)
	}
	forged := []string{
		"\x1esse:18446744073709551615\x1ex", // would push the resume point past every id
		"\x1esse:12\x1ebody",
		"\x1esse:1\x1e" + strings.Repeat("secret ", 100),
	}
	c := srv.Client()
	for _, p := range forged {
		if err := c.Publish(ctx, "user:42", p).Err(); err != nil {
			t.Fatal(err)
		}
	}
	seq, err := b.Publish(ctx, "user:42", []byte("resumable"), keep)
	if err != nil {
		t.Fatal(err)
	}
	msgs := rec.waitMessages(t, len(forged)+1)
	for i, p := range forged {
		if got := msgs[i]; got.Seq != 0 || got.Channel != "user:42" || string(got.Payload) != p {
			t.Fatalf("plain message %d = %s seq %d %q, want seq 0 and the payload untouched", i, got.Channel, got.Seq, trunc(got.Payload))
		}
	}
	if got := msgs[len(forged)]; got.Seq != seq || got.Channel != "user:42" || string(got.Payload) != "resumable" {
		t.Fatalf("resumable message = %s seq %d %q, want seq %d", got.Channel, got.Seq, got.Payload, seq)
	}
	if n := testutil.ToFloat64(m.Rejected.WithLabelValues("forged_frame")); n != float64(len(forged)) {
		t.Fatalf("rejected{forged_frame} = %v, want %d", n, len(forged))
	}
	warns := logs.FilterLevelExact(zap.WarnLevel).FilterField(zap.String("reason", "forged_frame")).All()
	if len(warns) != 1 {
		t.Fatalf("%d warnings for %d forged frames, want 1 (rate-limited)", len(warns), len(forged))
	}
	f := warns[0].ContextMap()
	if f["channel"] != "user:42" || !strings.HasPrefix(f["payload"].(string), `"\x1esse:`) {
		t.Fatalf("warning fields %v: want the channel and a quoted payload prefix", f)
	}
	if len(f["payload"].(string)) > 80 {
		t.Fatalf("the warning carries %d bytes of payload, want a short prefix", len(f["payload"].(string)))
	}
}

// A plain publish on a resumable channel's twin that is not a frame is
// dropped and counted: it names no id the history holds.
func TestTwinBadFrameDropped(t *testing.T) {
	srv := redistest.Start(t)
	rec := newRecorder()
	m := newMetrics()
	m.Rejected = newRejected()
	b := newBroker(t, srv, rec, m.Metrics)
	ctx := ctxT(t)
	if err := b.Subscribe(ctx, "t"); err != nil {
		t.Fatal(err)
	}
	c := srv.Client()
	for _, p := range []string{"garbage", "\x1esse:0\x1ex", "\x1esse:12"} {
		if err := c.Publish(ctx, ResumableChannelPrefix+"t", p).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Publish(ctx, "t", "after").Err(); err != nil {
		t.Fatal(err)
	}
	msgs := rec.waitMessages(t, 1)
	if len(msgs) != 1 || string(msgs[0].Payload) != "after" || msgs[0].Seq != 0 {
		t.Fatalf("messages = %+v, want only the plain one", msgs)
	}
	if n := testutil.ToFloat64(m.Rejected.WithLabelValues("bad_frame")); n != 3 {
		t.Fatalf("rejected{bad_frame} = %v, want 3", n)
	}
}

// Subscribe covers a channel and its resumable twin in one confirmed
// command, Unsubscribe drops both, a reconnect brings both back, and the
// caller only ever sees and counts its own channel names.
func TestTwinSubscription(t *testing.T) {
	srv := redistest.Start(t)
	rec := newRecorder()
	m := newMetrics()
	b := newBroker(t, srv, rec, m.Metrics)
	ctx := ctxT(t)
	c := srv.Client()
	if err := b.Subscribe(ctx, "a", "b"); err != nil {
		t.Fatal(err)
	}
	// Both are confirmed when Subscribe returns.
	for _, ch := range []string{"a", "b", ResumableChannelPrefix + "a", ResumableChannelPrefix + "b"} {
		if n := numsub(t, c, ch); n != 1 {
			t.Fatalf("NUMSUB %s = %d, want 1", ch, n)
		}
	}
	if got := m.channels(); got != 2 {
		t.Fatalf("Channels gauge = %v, want 2 (twins not counted)", got)
	}
	b.Unsubscribe("a")
	eventually(t, "a and its twin unsubscribed", func() bool {
		return numsub(t, c, "a") == 0 && numsub(t, c, ResumableChannelPrefix+"a") == 0
	})
	if got := m.channels(); got != 1 {
		t.Fatalf("Channels gauge = %v, want 1", got)
	}
	if err := c.ClientKillByFilter(ctx, "TYPE", "pubsub").Err(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "HandleReconnect", func() bool { return rec.reconnects.Load() == 1 })
	if numsub(t, c, "b") != 1 || numsub(t, c, ResumableChannelPrefix+"b") != 1 || numsub(t, c, ResumableChannelPrefix+"a") != 0 {
		t.Fatal("after the reconnect: want b and its twin subscribed, not a's twin")
	}
	seq, err := b.Publish(ctx, "b", []byte("r"), keep)
	if err != nil {
		t.Fatal(err)
	}
	if got := rec.waitMessages(t, 1)[0]; got.Channel != "b" || got.Seq != seq || string(got.Payload) != "r" {
		t.Fatalf("resumable message = %+v, want channel b seq %d", got, seq)
	}
}

// The twin names are the broker's: a caller cannot subscribe or publish on
// them, so no Redis channel is both a caller's channel and another's twin.
func TestReservedChannelRefused(t *testing.T) {
	srv := redistest.Start(t)
	m := newMetrics()
	b := newBroker(t, srv, newRecorder(), m.Metrics)
	ctx := ctxT(t)
	reserved := ResumableChannelPrefix + "user:42"
	if err := b.Subscribe(ctx, "ok", reserved); !errors.Is(err, ErrReservedChannel) {
		t.Fatalf("Subscribe(%q) = %v, want ErrReservedChannel", reserved, err)
	}
	if got := m.channels(); got != 0 {
		t.Fatalf("Channels gauge = %v after a refused Subscribe, want 0 (nothing subscribed)", got)
	}
	if _, err := b.Publish(ctx, reserved, []byte("\x1esse:9\x1ex"), Retention{}); !errors.Is(err, ErrReservedChannel) {
		t.Fatalf("Publish(%q) = %v, want ErrReservedChannel", reserved, err)
	}
	if _, err := b.Publish(ctx, reserved, []byte("x"), keep); !errors.Is(err, ErrReservedChannel) {
		t.Fatalf("Publish(%q) with history = %v, want ErrReservedChannel", reserved, err)
	}
	if err := b.EnsureHistory(ctx, keep); err != nil {
		t.Fatal(err)
	}
	if err := srv.Client().FCall(ctx, PublishFunction, []string{reserved}, "x").Err(); err == nil || !strings.Contains(err.Error(), "reserved") {
		t.Fatalf("FCALL on %q = %v, want refused", reserved, err)
	}
}

// The log of rejected messages: the first line at once, then at most one
// per period, with the number suppressed in between.
func TestRejectLimiter(t *testing.T) {
	var l rejectLimiter
	t0 := time.Unix(1000, 0)
	steps := []struct {
		at         time.Duration
		ok         bool
		suppressed int
	}{
		{0, true, 0},
		{time.Second, false, 0},
		{5 * time.Second, false, 0},
		{rejectLogEvery, true, 2},
		{rejectLogEvery + time.Second, false, 0},
		{3 * rejectLogEvery, true, 1},
		{3*rejectLogEvery + time.Millisecond, false, 0},
	}
	for i, s := range steps {
		ok, n := l.allow(t0.Add(s.at))
		if ok != s.ok || ok && n != s.suppressed {
			t.Fatalf("step %d at +%s: allow = %v, %d; want %v, %d", i, s.at, ok, n, s.ok, s.suppressed)
		}
	}
}

package broker

import (
	"testing"
	"time"

	"github.com/caddy-sse/caddy-sse/internal/redistest"
)

// A healthy connection passes the probe again and again, and the probe's
// messages never reach the Handler or the metrics.
func TestProbeQuietWhenHealthy(t *testing.T) {
	srv := redistest.Start(t)
	rec := newRecorder()
	m := newMetrics()
	b := startBroker(t, Options{Redis: parsedURL(t, srv.URL()), Metrics: m.Metrics,
		HealthCheck: 50 * time.Millisecond, Probe: 20 * time.Millisecond}, rec)
	if err := b.Subscribe(ctxT(t), "c"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "ten probes", func() bool { return b.probeSeen.Load() >= 10 })
	if n := len(rec.messages()); n != 0 || m.received() != 0 {
		t.Fatalf("the probe leaked: %d messages handed over, %v counted", n, m.received())
	}
	if rec.disconnects.Load() != 0 || m.channels() != 1 {
		t.Fatalf("disconnects %d, channels gauge %v", rec.disconnects.Load(), m.channels())
	}
}

// An ACL that forbids the probe's channel turns the probe off; it must not
// take every unanswered probe for a dead connection.
func TestProbeRefusedByACL(t *testing.T) {
	srv := redistest.Start(t)
	ctx := ctxT(t)
	c := srv.Client()
	rec := newRecorder()
	b := startBroker(t, Options{Redis: limitedUser(t, srv, "ok:*", "sse:r:ok:*"),
		HealthCheck: 50 * time.Millisecond, Probe: 20 * time.Millisecond}, rec)
	if err := b.Subscribe(ctx, "ok:1"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the probe to be turned off", b.probeOff.Load)
	time.Sleep(200 * time.Millisecond)
	if rec.disconnects.Load() != 0 {
		t.Fatal("a refused probe caused a reconnect")
	}
	if err := c.Publish(ctx, "ok:1", "x").Err(); err != nil {
		t.Fatal(err)
	}
	rec.waitMessages(t, 1)
}

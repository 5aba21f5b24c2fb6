package broker

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/caddy-sse/caddy-sse/internal/redistest"
)

// waitTimeout bounds every wait for something that should happen soon; it
// is a failure bound, never a speed assertion.
const waitTimeout = 10 * time.Second

// recorder is a Handler that keeps everything it is given.
type recorder struct {
	mu          sync.Mutex
	msgs        []Message
	notify      chan struct{}
	reconnects  atomic.Int32
	disconnects atomic.Int32
}

func newRecorder() *recorder { return &recorder{notify: make(chan struct{}, 1)} }

func (r *recorder) HandleMessage(m Message) {
	r.mu.Lock()
	r.msgs = append(r.msgs, m)
	r.mu.Unlock()
	r.poke()
}

func (r *recorder) HandleReconnect() {
	r.reconnects.Add(1)
	r.poke()
}

func (r *recorder) HandleDisconnect() {
	r.disconnects.Add(1)
	r.poke()
}

func (r *recorder) poke() {
	select {
	case r.notify <- struct{}{}:
	default:
	}
}

func (r *recorder) messages() []Message {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Message(nil), r.msgs...)
}

// waitMessages waits until at least n messages arrived and returns them.
func (r *recorder) waitMessages(t testing.TB, n int) []Message {
	t.Helper()
	deadline := time.After(waitTimeout)
	for {
		r.mu.Lock()
		got := len(r.msgs)
		r.mu.Unlock()
		if got >= n {
			return r.messages()
		}
		select {
		case <-r.notify:
		case <-deadline:
			t.Fatalf("received %d messages, want %d", got, n)
		}
	}
}

// eventually polls cond until it holds or waitTimeout passes.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

type testMetrics struct {
	Metrics
}

func newMetrics() testMetrics {
	return testMetrics{Metrics{
		Connected:  prometheus.NewGauge(prometheus.GaugeOpts{Name: "connected"}),
		Reconnects: prometheus.NewCounter(prometheus.CounterOpts{Name: "reconnects"}),
		Channels:   prometheus.NewGauge(prometheus.GaugeOpts{Name: "channels"}),
		Received:   prometheus.NewCounter(prometheus.CounterOpts{Name: "received"}),
	}}
}

func (m testMetrics) connected() float64  { return testutil.ToFloat64(m.Connected) }
func (m testMetrics) reconnects() float64 { return testutil.ToFloat64(m.Reconnects) }
func (m testMetrics) channels() float64   { return testutil.ToFloat64(m.Channels) }
func (m testMetrics) received() float64   { return testutil.ToFloat64(m.Received) }

// newBroker starts a broker on srv with a short health check, closed when
// the test ends.
func newBroker(t testing.TB, srv *redistest.Server, h Handler, m Metrics) *Broker {
	t.Helper()
	return newBrokerLog(t, srv, h, m, zaptest.NewLogger(t))
}

func newBrokerLog(t testing.TB, srv *redistest.Server, h Handler, m Metrics, log *zap.Logger) *Broker {
	t.Helper()
	return startBroker(t, Options{Redis: parsedURL(t, srv.URL()), Metrics: m, Logger: log, HealthCheck: 200 * time.Millisecond}, h)
}

// startBroker is New(opts, h), closed when the test ends; a broker without
// a Logger logs to the test.
func startBroker(t testing.TB, opts Options, h Handler) *Broker {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = zaptest.NewLogger(t)
	}
	b, err := New(opts, h)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

// parsedURL is ParseURL(url); a test's URL always parses.
func parsedURL(t testing.TB, url string) *redis.UniversalOptions {
	t.Helper()
	opts, err := ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	return opts
}

// limitedUser creates the ACL user "limited" (password "pw") on srv, allowed
// every command and key but only the channel patterns given, and returns
// the options that log in as it.
func limitedUser(t testing.TB, srv *redistest.Server, channels ...string) *redis.UniversalOptions {
	t.Helper()
	rules := []string{"resetchannels"}
	for _, c := range channels {
		rules = append(rules, "&"+c)
	}
	return parsedURL(t, srv.AddUser(t, "limited", "pw", append(rules, "+@all", "~*")...))
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	t.Cleanup(cancel)
	return ctx
}

// numsub is PUBSUB NUMSUB for one channel.
func numsub(t testing.TB, c *redis.Client, channel string) int64 {
	t.Helper()
	m, err := c.PubSubNumSub(context.Background(), channel).Result()
	if err != nil {
		t.Fatal(err)
	}
	return m[channel]
}

package stream

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-sse/caddy-sse/registry"
	"github.com/caddy-sse/caddy-sse/sse"
)

// source is a registry.Source with no Redis behind it: Subscribe confirms
// at once and there is no history.
type source struct{}

func (source) Subscribe(context.Context, ...string) error { return nil }
func (source) Unsubscribe(...string)                      {}
func (source) Replay(context.Context, []string, uint64) ([]registry.Message, bool, error) {
	return nil, false, nil
}
func (source) ReplayPage(context.Context, []string, uint64, int64) (registry.Page, error) {
	return registry.Page{}, nil
}

// counts records what the streams report.
type counts struct {
	delivered atomic.Int64
	mu        sync.Mutex
	ended     []registry.Reason
}

func (c *counts) Delivered(n int) { c.delivered.Add(int64(n)) }
func (c *counts) Ended(why registry.Reason) {
	c.mu.Lock()
	c.ended = append(c.ended, why)
	c.mu.Unlock()
}

type fixture struct {
	t       *testing.T
	reg     *registry.Registry
	opts    *Options
	metrics *counts
}

func newFixture(t *testing.T, keepalive time.Duration) *fixture {
	t.Helper()
	m := &counts{}
	reg := registry.New(registry.Options{Source: source{}})
	reg.Start()
	t.Cleanup(reg.Close)
	return &fixture{t: t, reg: reg, metrics: m, opts: &Options{
		Keepalive: keepalive, Evicted: []byte("event: bye\ndata: x\n\n"),
		Logger: zap.NewNop(), Metrics: m, Clock: NewClock(20 * time.Millisecond), Poller: NewPoller(zap.NewNop()),
	}}
}

// open attaches a stream on channel ch with a queue of buffer frames; ended
// receives its result.
func (f *fixture) open(ch string, buffer int, end Deadline) (*Stream, *registry.Subscriber, chan Result) {
	f.t.Helper()
	sub := registry.NewSubscriber([]string{ch}, sse.FormatRaw, buffer, false)
	ended := make(chan Result, 1)
	st := New(sub, f.opts, end, func(r Result) {
		f.reg.Detach(sub)
		ended <- r
	})
	if err := f.reg.Attach(context.Background(), sub); err != nil {
		f.t.Fatal(err)
	}
	st.SetCursor(f.reg.Cursor(sub, registry.EventID{}))
	return st, sub, ended
}

func (f *fixture) publish(ch string, payloads ...string) {
	for _, p := range payloads {
		f.reg.Deliver(registry.Message{Channel: ch, Payload: []byte(p)})
	}
}

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (server, client net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-accepted
	t.Cleanup(func() { server.Close(); client.Close() })
	return server, client
}

// readEvents reads n data lines from r, with a bound on the wait.
func readEvents(t *testing.T, r io.Reader, n int, within time.Duration) []string {
	t.Helper()
	type result struct {
		lines []string
		err   error
	}
	done := make(chan result, 1)
	go func() {
		var got []string
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for len(got) < n && sc.Scan() {
			if d, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
				got = append(got, d)
			}
		}
		done <- result{got, sc.Err()}
	}()
	select {
	case r := <-done:
		if len(r.lines) < n {
			t.Fatalf("read %d of %d events: %v", len(r.lines), n, r.err)
		}
		return r.lines
	case <-time.After(within):
		t.Fatalf("did not read %d events within %s", n, within)
		return nil
	}
}

func waitEnd(t *testing.T, ended chan Result, within time.Duration) Result {
	t.Helper()
	select {
	case r := <-ended:
		return r
	case <-time.After(within):
		t.Fatalf("the stream did not end within %s", within)
		return Result{}
	}
}

func TestTakenOverWritesInOrderAndEndsOnClientClose(t *testing.T) {
	f := newFixture(t, time.Hour)
	st, _, ended := f.open("c", 16, Deadline{})
	server, client := tcpPair(t)
	st.SetSink(NewConnSink(server))
	if err := st.Write([][]byte{[]byte(": open\n\n")}, 0); err != nil {
		t.Fatal(err)
	}
	st.TakeOver(1024)
	for i := range 100 {
		f.publish("c", fmt.Sprint(i))
	}
	got := readEvents(t, client, 100, 5*time.Second)
	for i, d := range got {
		if d != fmt.Sprint(i) {
			t.Fatalf("event %d: got %q", i, d)
		}
	}
	client.Close()
	r := waitEnd(t, ended, 5*time.Second)
	if r.Reason != ReasonClient || r.Events != 100 || !r.Takeover {
		t.Fatalf("end: %+v, want reason client, 100 events, takeover", r)
	}
	if n := f.metrics.delivered.Load(); n != 100 {
		t.Fatalf("delivered %d, want 100", n)
	}
	if f.opts.Clock.Len() != 0 {
		t.Fatal("the ended stream is still on the clock")
	}
}

// A burst larger than the queue reaches a client that reads: the socket's
// buffer absorbs it first, and only what it cannot take is queued.
func TestTakenOverBurstReachesFastReader(t *testing.T) {
	f := newFixture(t, time.Hour)
	st, _, ended := f.open("c", 64, Deadline{})
	server, client := tcpPair(t)
	st.SetSink(NewConnSink(server))
	st.TakeOver(1024)
	payload := strings.Repeat("x", 2000)
	const n = 5000
	read := make(chan int, 1)
	go func() {
		got := 0
		sc := bufio.NewScanner(client)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for got < n && sc.Scan() {
			if strings.HasPrefix(sc.Text(), "data: ") {
				got++
			}
		}
		read <- got
	}()
	for i := range n {
		f.publish("c", fmt.Sprintf("%d %s", i, payload))
	}
	select {
	case got := <-read:
		if got != n {
			t.Fatalf("the reader got %d of %d events", got, n)
		}
	case r := <-ended:
		t.Fatalf("the stream ended during the burst: %+v", r)
	case <-time.After(20 * time.Second):
		t.Fatal("the burst did not arrive within 20s")
	}
}

// A client that never reads is cut off once the socket and the queue are
// full, and is counted as an overflow.
func TestTakenOverNonReaderOverflows(t *testing.T) {
	f := newFixture(t, time.Hour)
	st, _, ended := f.open("c", 8, Deadline{})
	server, _ := tcpPair(t)
	st.SetSink(NewConnSink(server))
	st.TakeOver(1024)
	payload := strings.Repeat("y", 64<<10)
	deadline := time.Now().Add(20 * time.Second)
	for i := 0; time.Now().Before(deadline); i++ {
		f.publish("c", payload)
		select {
		case r := <-ended:
			if r.Reason != registry.ReasonOverflow {
				t.Fatalf("reason %q, want overflow", r.Reason)
			}
			return
		default:
		}
		if i%64 == 63 {
			time.Sleep(time.Millisecond)
		}
	}
	t.Fatal("a client that never reads was not cut off")
}

func TestTakenOverKeepaliveAndDeadline(t *testing.T) {
	f := newFixture(t, 50*time.Millisecond)
	st, _, ended := f.open("c", 8, Deadline{At: time.Now().Add(400 * time.Millisecond), Reason: ReasonMaxDuration})
	server, client := tcpPair(t)
	st.SetSink(NewConnSink(server))
	st.TakeOver(1024)
	got, err := io.ReadAll(client)
	if err != nil {
		t.Fatal(err)
	}
	if c := bytes.Count(got, sse.Comment); c < 2 {
		t.Fatalf("%d keepalives in 400ms at 50ms: %q", c, got)
	}
	if r := waitEnd(t, ended, 2*time.Second); r.Reason != ReasonMaxDuration {
		t.Fatalf("reason %q, want max_duration", r.Reason)
	}
}

// A client that sends more than it may after its request is cut off.
func TestTakenOverClientSendingTooMuch(t *testing.T) {
	f := newFixture(t, time.Hour)
	st, _, ended := f.open("c", 8, Deadline{})
	server, client := tcpPair(t)
	st.SetSink(NewConnSink(server))
	st.TakeOver(4096)
	if _, err := client.Write(make([]byte, 2048)); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-ended:
		t.Fatalf("ended within the budget: %+v", r)
	case <-time.After(200 * time.Millisecond):
	}
	_, _ = client.Write(make([]byte, 8192))
	if r := waitEnd(t, ended, 5*time.Second); r.Reason != ReasonClient {
		t.Fatalf("reason %q, want client", r.Reason)
	}
}

func TestEvictedStreamIsToldAndEnds(t *testing.T) {
	f := newFixture(t, time.Hour)
	st, sub, ended := f.open("c", 8, Deadline{})
	server, client := net.Pipe()
	defer client.Close()
	st.SetSink(NewConnSink(server))
	st.TakeOver(1024)
	go sub.End(registry.ReasonEvicted)
	got, _ := io.ReadAll(client)
	if !bytes.Contains(got, []byte("event: bye")) {
		t.Fatalf("evicted stream got %q", got)
	}
	if r := waitEnd(t, ended, 2*time.Second); r.Reason != registry.ReasonEvicted {
		t.Fatalf("reason %q", r.Reason)
	}
}

// Served through a response writer, the stream flushes each batch and ends
// when the request's context does.
func TestServeThroughResponseWriter(t *testing.T) {
	f := newFixture(t, time.Hour)
	st, _, ended := f.open("c", 16, Deadline{})
	rec := httptest.NewRecorder()
	rs := NewResponseSink(rec, nil)
	rs.Start(true)
	st.SetSink(rs)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		st.Serve(ctx)
		close(done)
	}()
	f.publish("c", "a", "b")
	deadline := time.Now().Add(5 * time.Second)
	for f.metrics.delivered.Load() < 2 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	<-done
	if r := waitEnd(t, ended, time.Second); r.Reason != ReasonClient || r.Events != 2 || r.Takeover {
		t.Fatalf("end: %+v", r)
	}
	if body := rec.Body.String(); body != "data: a\n\ndata: b\n\n" || rec.Code != http.StatusOK || !rec.Flushed {
		t.Fatalf("status %d flushed %v body %q", rec.Code, rec.Flushed, body)
	}
}

// A served write blocked on a client that stopped reading ends at the
// sink's own write deadline, and the stream ends as an overflow.
func TestServeBlockedWriteEndsAtDeadline(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for the write timeout")
	}
	f := newFixture(t, time.Hour)
	st, sub, ended := f.open("c", 2, Deadline{})
	server, client := tcpPair(t)
	defer client.Close()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rs := NewResponseSink(w, nil)
		rs.Start(true)
		st.SetSink(rs)
		st.Serve(r.Context())
	})}
	ln := newOneConnListener(server)
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()
	if _, err := client.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	payload := strings.Repeat("z", 256<<10)
	for i := 0; sub.Reason() == "" && i < 400; i++ {
		f.publish("c", payload)
		time.Sleep(5 * time.Millisecond)
	}
	if sub.Reason() != registry.ReasonOverflow {
		t.Fatalf("the queue of a client that does not read did not overflow: %q", sub.Reason())
	}
	if r := waitEnd(t, ended, WriteTimeout+5*time.Second); r.Reason != registry.ReasonOverflow {
		t.Fatalf("reason %q, want overflow", r.Reason)
	}
}

// oneConnListener hands out one connection, then blocks until closed.
type oneConnListener struct {
	conn   net.Conn
	served atomic.Bool
	once   sync.Once
	done   chan struct{}
}

func newOneConnListener(c net.Conn) *oneConnListener {
	return &oneConnListener{conn: c, done: make(chan struct{})}
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	if l.served.CompareAndSwap(false, true) {
		return l.conn, nil
	}
	<-l.done
	return nil, net.ErrClosed
}
func (l *oneConnListener) Close() error   { l.once.Do(func() { close(l.done) }); return nil }
func (l *oneConnListener) Addr() net.Addr { return l.conn.LocalAddr() }

func TestShutdownEndsStreams(t *testing.T) {
	f := newFixture(t, time.Hour)
	var ends []chan Result
	for range 5 {
		st, _, ended := f.open("c", 8, Deadline{})
		server, client := tcpPair(t)
		go func() { _, _ = io.Copy(io.Discard, client) }()
		st.SetSink(NewConnSink(server))
		st.TakeOver(1024)
		ends = append(ends, ended)
	}
	f.opts.Clock.Shutdown(50 * time.Millisecond)
	f.opts.Clock.Wait(2 * time.Second)
	for _, e := range ends {
		if r := waitEnd(t, e, time.Second); r.Reason != registry.ReasonShutdown {
			t.Fatalf("reason %q, want shutdown", r.Reason)
		}
	}
}

type wrapped struct{ net.Conn }

func TestInnermost(t *testing.T) {
	server, _ := tcpPair(t)
	if got := Innermost(&wrapped{&wrapped{server}}); got != server {
		t.Fatalf("Innermost = %T, want the TCP connection", got)
	}
	p, _ := net.Pipe()
	if got := Innermost(p); got != p {
		t.Fatalf("Innermost of a pipe = %T", got)
	}
}

// The clock's list stays exact through adds (twice, too) and removes in any
// order: a stream left in it would be driven after its end.
func TestClockListAddRemove(t *testing.T) {
	c := NewClock(time.Hour)
	streams := make([]*Stream, 200)
	for i := range streams {
		streams[i] = &Stream{clockAt: -1}
		c.add(streams[i])
		c.add(streams[i])
	}
	if n := c.Len(); n != len(streams) {
		t.Fatalf("Len = %d after adding %d streams (each twice), want %d", n, len(streams), len(streams))
	}
	for _, i := range rand.Perm(len(streams))[:150] {
		c.remove(streams[i])
		c.remove(streams[i])
		streams[i] = nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	left := 0
	for _, s := range streams {
		if s == nil {
			continue
		}
		left++
		if i := int(s.clockAt); i < 0 || i >= len(c.streams) || c.streams[i] != s {
			t.Errorf("a stream still added is not at its index %d", i)
		}
	}
	if len(c.streams) != left {
		t.Errorf("the clock holds %d streams, want %d", len(c.streams), left)
	}
}

package caddysse_test

// Load-ish resilience tests: thousands of streams against a real Caddy and
// Redis. Each runs in well under 30 s; SSE_LONG=1 runs the long versions.
// They assert behaviour (nothing dropped, lost or leaked) and log timings
// and sizes, never assert them.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

// longLoad reports whether the long versions were asked for.
func longLoad() bool { return os.Getenv("SSE_LONG") != "" }

// raiseNoFile lifts the open-file limit to the hard limit: thousands of
// client sockets live in this process, and Caddy inherits the limit.
func raiseNoFile(t *testing.T) {
	t.Helper()
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		t.Fatal(err)
	}
	if r.Cur < r.Max {
		r.Cur = r.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
			t.Fatal(err)
		}
	}
}

// loadDialer spreads client connections over source addresses 127.0.0.2
// to 127.0.0.201, so that tens of thousands of connections (and their
// TIME_WAIT) never run out of ephemeral ports.
type loadDialer struct{ n atomic.Uint32 }

func (d *loadDialer) dial(addr string) (net.Conn, error) {
	i := d.n.Add(1)
	nd := net.Dialer{
		Timeout:   10 * time.Second,
		LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(2+i%200))},
	}
	return nd.Dial("tcp", addr)
}

// rawStream is a minimal SSE client for load: a hand-written request on one
// connection and a reader goroutine that counts events and comments. The
// stream clients of internal/sseclient keep too much per stream for
// thousands of them.
type rawStream struct {
	conn     net.Conn
	events   atomic.Int64
	comments atomic.Int64
	done     chan struct{}
	err      error // why the stream ended; valid once done is closed
	onEvent  func(data string)
}

// openRaw opens path and returns once the response head and the opening
// comment arrived, so that the stream is admitted and subscribed.
func openRaw(d *loadDialer, addr, path string, onEvent func(string)) (*rawStream, error) {
	conn, err := d.dial(addr)
	if err != nil {
		return nil, err
	}
	s := &rawStream{conn: conn, done: make(chan struct{}), onEvent: onEvent}
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n", path, addr); err != nil {
		conn.Close()
		return nil, err
	}
	br := bufio.NewReaderSize(conn, 1024)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		conn.Close()
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		conn.Close()
		return nil, fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	body := bufio.NewReaderSize(resp.Body, 1024)
	if line, err := body.ReadString('\n'); err != nil || !strings.HasPrefix(line, ":") {
		conn.Close()
		return nil, fmt.Errorf("GET %s: first line %q: %v", path, line, err)
	}
	_ = conn.SetDeadline(time.Time{})
	go s.read(body)
	return s, nil
}

func (s *rawStream) read(br *bufio.Reader) {
	defer close(s.done)
	var data, long []byte
	have := false
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			// A line longer than the buffer: gather it.
			long = append(long[:0], line...)
			for errors.Is(err, bufio.ErrBufferFull) {
				line, err = br.ReadSlice('\n')
				long = append(long, line...)
			}
			line = long
		}
		if err != nil {
			s.err = err
			return
		}
		line = line[:len(line)-1]
		switch {
		case len(line) == 0:
			if have {
				s.events.Add(1)
				if s.onEvent != nil {
					s.onEvent(string(data))
				}
			}
			data, have = data[:0], false
		case line[0] == ':':
			s.comments.Add(1)
		default:
			if v, ok := strings.CutPrefix(string(line), "data: "); ok {
				data, have = append(data, v...), true
			}
		}
	}
}

func (s *rawStream) Close() { s.conn.Close() }

func (s *rawStream) ended() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// openMany opens n streams, path(i) each, from a few dozen goroutines.
func openMany(t *testing.T, d *loadDialer, in *caddyproc.Instance, n int, path func(i int) string, onEvent func(i int) func(string)) []*rawStream {
	t.Helper()
	streams := make([]*rawStream, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				var cb func(string)
				if onEvent != nil {
					cb = onEvent(i)
				}
				s, err := openRaw(d, in.Addr(), path(i), cb)
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					return
				}
				streams[i] = s
			}
		}()
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, s := range streams {
			if s != nil {
				s.Close()
			}
		}
	})
	if firstErr != nil {
		t.Fatalf("opening %d streams: %v", n, firstErr)
	}
	return streams
}

// waitMetric waits until an unlabelled metric satisfies ok.
func waitMetric(t *testing.T, in *caddyproc.Instance, name string, within time.Duration, ok func(float64) bool) float64 {
	t.Helper()
	return ssetest.WaitMetric(t, in.AdminURL()+"/metrics", name, within, ok)
}

// rssKiB is the resident set size of a process, from /proc.
func rssKiB(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n
		}
	}
	return -1
}

// goroutines is the count Caddy's admin pprof endpoint reports.
func goroutines(t *testing.T, in *caddyproc.Instance) int {
	t.Helper()
	resp, err := http.Get(in.AdminURL() + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	line, _ := bufio.NewReader(resp.Body).ReadString('\n')
	n, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(line, "goroutine profile: total")))
	if err != nil {
		t.Fatalf("goroutine profile: %q: %v", line, err)
	}
	return n
}

var loadCaddyfile = globalOptions + `
http://127.0.0.1:{HTTP} {
	sse /events/* {
		redis {REDIS}
		channel {path.1}
		keepalive {KEEPALIVE}
	}
	sse /resumable/* {
		redis {REDIS}
		channel {path.1}
		history 100000
		keepalive {KEEPALIVE}
	}
	sse /lat/* {
		redis {REDIS}
		channel {path.1}
		buffer 64
	}
	sse /slow/* {
		redis {REDIS}
		channel lat {path.1}
		buffer 64
	}
}
`

func startLoad(t *testing.T, keepalive string) (*redistest.Server, *caddyproc.Instance, caddyproc.Options) {
	t.Helper()
	caddyproc.SkipShort(t)
	raiseNoFile(t)
	rs := redistest.Start(t)
	vars := caddyproc.Options{"{REDIS}": rs.URL(), "{KEEPALIVE}": keepalive}
	return rs, caddyproc.Start(t, loadCaddyfile, vars), vars
}

// Redis dies while 1,000 streams are open: they stay open with keepalives,
// the broker reconnects with capped backoff once Redis is back and
// resubscribes every channel, the next PUBLISH reaches every stream, and
// the metrics show the outage.
func TestLoadRedisKilledWith1000Streams(t *testing.T) {
	const streams, channels = 1000, 50
	outage := 3 * time.Second
	if longLoad() {
		outage = 20 * time.Second // long enough for the backoff to reach its cap
	}
	rs, in, _ := startLoad(t, "500ms")
	d := &loadDialer{}
	all := openMany(t, d, in, streams, func(i int) string { return fmt.Sprintf("/events/o%d", i%channels) }, nil)
	waitMetric(t, in, "caddy_sse_streams_open", 10*time.Second, ssetest.Is(streams))
	rdb := rs.Client()
	ctx := context.Background()
	ssetest.Wait(t, 10*time.Second, "every channel subscribed", func() bool {
		return len(rdb.PubSubChannels(ctx, "o*").Val()) == channels
	})

	rs.Stop()
	waitMetric(t, in, "caddy_sse_redis_connected", 10*time.Second, ssetest.Is(0))
	before := make([]int64, streams)
	for i, s := range all {
		before[i] = s.comments.Load()
	}
	time.Sleep(outage)
	for i, s := range all {
		if s.ended() {
			t.Fatalf("stream %d ended during the outage: %v", i, s.err)
		}
		if s.comments.Load() <= before[i] {
			t.Fatalf("stream %d got no keepalive during the outage", i)
		}
	}

	restarted := time.Now()
	rs.Restart()
	waitMetric(t, in, "caddy_sse_redis_connected", 15*time.Second, ssetest.Is(1))
	reconnected := time.Since(restarted)
	if n := ssetest.Metric(t, in.AdminURL()+"/metrics", "caddy_sse_redis_reconnects_total"); n < 1 {
		t.Fatalf("caddy_sse_redis_reconnects_total %v after the outage", n)
	}
	ssetest.Wait(t, 10*time.Second, "every channel resubscribed", func() bool {
		return len(rdb.PubSubChannels(ctx, "o*").Val()) == channels
	})
	published := time.Now()
	for c := range channels {
		if err := rdb.Publish(ctx, fmt.Sprintf("o%d", c), "after the outage").Err(); err != nil {
			t.Fatal(err)
		}
	}
	ssetest.Wait(t, 15*time.Second, "the event on every stream", func() bool {
		for _, s := range all {
			if s.events.Load() < 1 {
				return false
			}
		}
		return true
	})
	t.Logf("%d streams, outage %v: reconnected %v after Redis was back; the next PUBLISH reached all of them in %v",
		streams, outage, reconnected.Round(time.Millisecond), time.Since(published).Round(time.Millisecond))
}

// `caddy reload` every second under a steady resumable publish load: no
// stream is dropped, and every stream gets every event of its channel, in
// order, exactly once.
func TestLoadReloadUnderPublishLoad(t *testing.T) {
	const streams, channels = 200, 20
	reloads := 10
	if longLoad() {
		reloads = 30
	}
	rs, in, vars := startLoad(t, "15s")
	rdb := rs.Client()
	waitFunctions(t, rdb)
	ctx := context.Background()

	var faults atomic.Int64
	var firstFault atomic.Value
	d := &loadDialer{}
	all := openMany(t, d, in, streams, func(i int) string { return fmt.Sprintf("/resumable/rl%d", i%channels) },
		func(i int) func(string) {
			want := 0
			return func(data string) {
				if data != strconv.Itoa(want) {
					faults.Add(1)
					firstFault.CompareAndSwap(nil, fmt.Sprintf("stream %d: got %q, want %d", i, data, want))
					if n, err := strconv.Atoi(data); err == nil {
						want = n
					}
				}
				want++
			}
		})

	// Publish round-robin at about 400 events a second until the reloads end.
	sent := make([]int, channels)
	stop := make(chan struct{})
	pubDone := make(chan error, 1)
	go func() {
		tick := time.NewTicker(time.Second / 400)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-stop:
				pubDone <- nil
				return
			case <-tick.C:
			}
			c := i % channels
			if err := rdb.FCall(ctx, "sse_publish", []string{fmt.Sprintf("rl%d", c)}, strconv.Itoa(sent[c])).Err(); err != nil {
				pubDone <- err
				return
			}
			sent[c]++
		}
	}()
	start := time.Now()
	for i := range reloads {
		time.Sleep(time.Second)
		// A config that differs each time, or Caddy would skip the load.
		v := caddyproc.Options{"{REDIS}": vars["{REDIS}"], "{KEEPALIVE}": fmt.Sprintf("%ds", 15+i%2)}
		if err := in.Reload(loadCaddyfile, v); err != nil {
			t.Fatalf("reload %d: %v", i, err)
		}
	}
	close(stop)
	if err := <-pubDone; err != nil {
		t.Fatal(err)
	}
	elapsed := time.Since(start)
	total := 0
	for _, n := range sent {
		total += n
	}
	ssetest.Wait(t, 20*time.Second, "every event on every stream", func() bool {
		for i, s := range all {
			if s.events.Load() < int64(sent[i%channels]) {
				return false
			}
		}
		return true
	})
	time.Sleep(200 * time.Millisecond) // a duplicate would arrive now
	for i, s := range all {
		if s.ended() {
			t.Fatalf("stream %d was dropped: %v", i, s.err)
		}
		if got, want := s.events.Load(), int64(sent[i%channels]); got != want {
			t.Fatalf("stream %d got %d events, want %d", i, got, want)
		}
	}
	if n := faults.Load(); n > 0 {
		t.Fatalf("%d events out of sequence; first: %v", n, firstFault.Load())
	}
	t.Logf("%d reloads in %v while %d resumable events (%.0f/s) went to %d streams: none dropped, none lost",
		reloads, elapsed.Round(time.Millisecond), total, float64(total)/elapsed.Seconds(), streams)
}

// Stopping Caddy with 5,000 open streams ends promptly.
func TestLoadStopWith5000Streams(t *testing.T) {
	const streams, channels = 5000, 100
	_, in, _ := startLoad(t, "15s")
	d := &loadDialer{}
	all := openMany(t, d, in, streams, func(i int) string { return fmt.Sprintf("/events/s%d", i%channels) }, nil)
	waitMetric(t, in, "caddy_sse_streams_open", 30*time.Second, ssetest.Is(streams))
	rss := rssKiB(t, in.Pid())
	took, err := in.Stop(30 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	ssetest.Wait(t, 10*time.Second, "every stream to end", func() bool {
		for _, s := range all {
			if !s.ended() {
				return false
			}
		}
		return true
	})
	t.Logf("caddy exited %v after /stop with %d open streams (RSS before the stop %d MiB)",
		took.Round(time.Millisecond), streams, rss/1024)
}

// One client among 1,000 stops reading: the others keep getting every
// event. Logs their delivery latency (p50/p99) without and with the slow
// client, and Caddy's RSS.
func TestLoadSlowClientAmong1000(t *testing.T) {
	const streams = 1000
	events, rate := 100, 25 // per phase, per second
	if longLoad() {
		events = 500
	}
	rs, in, _ := startLoad(t, "15s")
	rdb := rs.Client()
	ctx := context.Background()

	var mu sync.Mutex
	var lat []time.Duration
	var faults atomic.Int64
	d := &loadDialer{}
	all := openMany(t, d, in, streams, func(int) string { return "/lat/lat" }, func(int) func(string) {
		return func(data string) {
			ts, _, ok := strings.Cut(data, " ")
			ns, err := strconv.ParseInt(ts, 10, 64)
			if !ok || err != nil {
				faults.Add(1)
				return
			}
			l := time.Since(time.Unix(0, ns))
			mu.Lock()
			lat = append(lat, l)
			mu.Unlock()
		}
	})
	waitMetric(t, in, "caddy_sse_streams_open", 10*time.Second, ssetest.Is(streams))
	pad := strings.Repeat("x", 2048)

	phase := func(name string, base int64) (p50, p99 time.Duration) {
		mu.Lock()
		lat = lat[:0]
		mu.Unlock()
		for range events {
			if err := rdb.Publish(ctx, "lat", strconv.FormatInt(time.Now().UnixNano(), 10)+" "+pad).Err(); err != nil {
				t.Fatal(err)
			}
			time.Sleep(time.Second / time.Duration(rate))
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			behind, ended := 0, 0
			var min int64 = 1 << 62
			for _, s := range all {
				if n := s.events.Load(); n < base+int64(events) {
					behind++
					if n < min {
						min = n
					}
				}
				if s.ended() {
					ended++
				}
			}
			if behind == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d fast streams lack events (fewest %d of %d), %d ended; metrics:\n%s",
					name, behind, min, base+int64(events), ended, ssetest.Lines(ssetest.Metrics(t, in.AdminURL()+"/metrics"), "caddy_sse_"))
			}
			time.Sleep(20 * time.Millisecond)
		}
		mu.Lock()
		defer mu.Unlock()
		slices.Sort(lat)
		return lat[len(lat)/2], lat[len(lat)*99/100]
	}

	p50a, p99a := phase("without a slow client", 0)
	rssA := rssKiB(t, in.Pid())

	// The slow client: a small receive buffer, and it never reads.
	slow, err := (&net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) {
			_ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
		})
	}}).Dial("tcp", in.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	// It listens to the fast streams' channel and to one of its own, which
	// fills its socket buffers at once: its queue then overflows during
	// the phase.
	fmt.Fprintf(slow, "GET /slow/bulk HTTP/1.1\r\nHost: %s\r\n\r\n", in.Addr())
	waitMetric(t, in, "caddy_sse_streams_open", 10*time.Second, ssetest.Is(streams+1))
	bulk := strings.Repeat("b", 64<<10)
	for range 64 {
		if err := rdb.Publish(ctx, "bulk", bulk).Err(); err != nil {
			t.Fatal(err)
		}
	}

	p50b, p99b := phase("with a slow client", int64(events))
	rssB := rssKiB(t, in.Pid())
	for i, s := range all {
		if s.ended() {
			t.Fatalf("fast stream %d ended: %v", i, s.err)
		}
	}
	if n := faults.Load(); n > 0 {
		t.Fatalf("%d events garbled", n)
	}
	// The slow client was cut off when its queue overflowed.
	waitMetric(t, in, "caddy_sse_streams_open", 10*time.Second, ssetest.Is(streams))
	t.Logf("%d streams, %d events of 2 KiB at %d/s per phase: delivery p50 %v p99 %v without the slow client, p50 %v p99 %v with it (it was cut off); Caddy RSS %d MiB, %d MiB",
		streams, events, rate, p50a.Round(time.Microsecond), p99a.Round(time.Microsecond),
		p50b.Round(time.Microsecond), p99b.Round(time.Microsecond), rssA/1024, rssB/1024)
}

// 2,000 connects and disconnects a second: afterwards no stream, no
// subscription and no goroutine is left behind.
func TestLoadConnectionChurn(t *testing.T) {
	const rate, channels = 2000, 500
	dur := 10 * time.Second
	if longLoad() {
		dur = 30 * time.Second
	}
	rs, in, _ := startLoad(t, "15s")
	rdb := rs.Client()
	ctx := context.Background()
	d := &loadDialer{}

	// The baseline: after one stream came and went, and idle goroutines of
	// the admin endpoint and the Redis client settled.
	s, err := openRaw(d, in.Addr(), "/events/warmup", nil)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	waitMetric(t, in, "caddy_sse_streams_open", 10*time.Second, ssetest.Is(0))
	time.Sleep(500 * time.Millisecond)
	base := goroutines(t, in)

	total := int(dur.Seconds()) * rate
	interval := time.Second / rate
	var next, done, failed atomic.Int64
	var firstErr atomic.Value
	start := time.Now()
	var wg sync.WaitGroup
	for range 128 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= int64(total) {
					return
				}
				time.Sleep(time.Until(start.Add(time.Duration(i) * interval)))
				s, err := openRaw(d, in.Addr(), fmt.Sprintf("/events/churn%d", i%channels), nil)
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				s.Close()
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if n := failed.Load(); n > 0 {
		t.Fatalf("%d of %d connections failed; first: %v", n, total, firstErr.Load())
	}
	waitMetric(t, in, "caddy_sse_streams_open", 15*time.Second, ssetest.Is(0))
	ssetest.Wait(t, 15*time.Second, "no channel left subscribed", func() bool {
		return len(rdb.PubSubChannels(ctx, "*").Val()) == 0
	})
	// Goroutines of closing connections take a moment to go.
	var after int
	ssetest.Wait(t, 15*time.Second, "the goroutine count back to its baseline", func() bool {
		after = goroutines(t, in)
		return after <= base+5
	})
	t.Logf("%d connects/disconnects in %v (%.0f/s): streams open 0, channels subscribed 0, goroutines %d before and %d after",
		done.Load(), elapsed.Round(time.Millisecond), float64(done.Load())/elapsed.Seconds(), base, after)
}

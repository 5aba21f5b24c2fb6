package caddysse_test

// Abuse: clients that do not play by the rules, against a real Caddy and
// Redis. None of them may crash the process, keep a stream it does not read,
// cost work per byte it sends after its request, or make a resume hold the
// whole history in memory. See SPEC.md: "The stream", "Resume", "Security",
// "Scale and cost".

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

const (
	// writeTimeout is the handler's bound on a write to a client that
	// stopped reading (handler.go); abuseBound is how long a stream it
	// cannot write may live after that.
	writeTimeout = 10 * time.Second
	abuseBound   = writeTimeout + 10*time.Second
	// stalledStreams is how many flow-control-stalled HTTP/2 streams the
	// window test opens.
	stalledStreams = 200
)

// abuseCaddyfile serves the same routes over HTTPS (HTTP/2, {HTTP}) and
// plain HTTP/1.1 ({PLAIN}, streams taken over by default).
const abuseCaddyfile = `{
	admin 127.0.0.1:{ADMIN}
	skip_install_trust
	persist_config off
	local_certs
	auto_https disable_redirects
	default_bind 127.0.0.1
	default_sni 127.0.0.1
	storage file_system {STORAGE}
}

(routes) {
	sse /stall/* {
		redis {REDIS}
		channel {path.1}
		buffer 4
	}
	sse /multi/* {
		redis {REDIS}
		channel {path.1} shared
		buffer 16
	}
	sse /resume/* {
		redis {REDIS}
		channel {path.1}
		history 1000
		buffer 16
	}
}

https://127.0.0.1:{HTTP} {
	tls internal
	import routes
}

http://127.0.0.1:{PLAIN} {
	import routes
}
`

type abuseEnv struct {
	rs    *redistest.Server
	in    *caddyproc.Instance
	plain string // host:port of the HTTP/1.1 site
	alive *aliveWatch
}

func startAbuse(t *testing.T) *abuseEnv {
	t.Helper()
	caddyproc.SkipShort(t)
	raiseNoFile(t)
	rs := redistest.Start(t)
	plain := fmt.Sprintf("127.0.0.1:%d", caddyproc.FreePort(t))
	in := caddyproc.Start(t, abuseCaddyfile, caddyproc.Options{
		"{REDIS}": rs.URL(), "{STORAGE}": t.TempDir(), "{PLAIN}": strings.Split(plain, ":")[1],
	})
	e := &abuseEnv{rs: rs, in: in, plain: plain, alive: watchAlive(in.Pid())}
	t.Cleanup(e.alive.stop)
	return e
}

// waitTLS waits until Caddy's internal certificate is issued (in the
// background at start) and the site negotiates h2.
func (e *abuseEnv) waitTLS(t *testing.T) {
	t.Helper()
	var err error
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		var c *tls.Conn
		if c, err = tls.Dial("tcp", e.in.Addr(), h2TLS()); err == nil {
			proto := c.ConnectionState().NegotiatedProtocol
			c.Close()
			if proto == "h2" {
				return
			}
			err = fmt.Errorf("negotiated %q, want h2", proto)
		}
	}
	t.Fatalf("TLS on %s: %v", e.in.Addr(), err)
}

func h2TLS() *tls.Config {
	return &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}} // Caddy's internal CA
}

// h2Stream opens a normal stream with Go's HTTP/2 client, on a connection
// of its own.
func (e *abuseEnv) h2Stream(t *testing.T, path string) *sseclient.Stream {
	t.Helper()
	tr := &http.Transport{TLSClientConfig: h2TLS(), ForceAttemptHTTP2: true}
	t.Cleanup(tr.CloseIdleConnections)
	req, _ := http.NewRequest(http.MethodGet, "https://"+e.in.Addr()+path, nil)
	s, err := sseclient.Open(context.Background(), &http.Client{Transport: tr}, req)
	if err != nil {
		e.check(t)
		t.Fatalf("open %s over h2: %v", path, err)
	}
	t.Cleanup(s.Close)
	if s.Resp.ProtoMajor != 2 {
		t.Fatalf("%s: protocol %s, want HTTP/2", path, s.Resp.Proto)
	}
	return s
}

// metric reads one metric line (labels included in name); an absent one is
// 0. A dead Caddy fails the test here with its logs.
func (e *abuseEnv) metric(t *testing.T, name string) float64 {
	t.Helper()
	e.check(t)
	if v := ssetest.Metric(t, e.in.AdminURL()+"/metrics", name); v >= 0 {
		return v
	}
	return 0
}

// waitMetric waits within d for a metric to equal want.
func (e *abuseEnv) waitMetric(t *testing.T, name string, want float64, d time.Duration) {
	t.Helper()
	e.check(t)
	ssetest.WaitMetric(t, e.in.AdminURL()+"/metrics", name, d, func(v float64) bool {
		e.check(t)
		return v == want || v == -1 && want == 0 // an absent series is 0
	})
}

// waitUnsubscribed waits within d until no instance listens to channel.
func (e *abuseEnv) waitUnsubscribed(t *testing.T, d time.Duration, channels ...string) {
	t.Helper()
	rdb := e.rs.Client()
	for _, ch := range channels {
		ssetest.Wait(t, d, "PUBSUB NUMSUB "+ch+" = 0", func() bool {
			e.check(t)
			return ssetest.Numsub(t, rdb, ch) == 0
		})
	}
}

// check fails the test if Caddy died at any time so far, or if its output
// shows a panic or a data race, with the part of the output that says so.
func (e *abuseEnv) check(t *testing.T) {
	t.Helper()
	logs := e.in.Logs()
	var problems, excerpts []string
	if at := e.alive.diedAt(); !at.IsZero() {
		problems = append(problems, "died at "+at.Format("15:04:05.000"))
	}
	for _, p := range []struct{ mark, what string }{
		{"WARNING: DATA RACE", "reported a data race"},
		{"panic:", "panicked"},
		{"panic", `printed "panic"`},
	} {
		if i := strings.Index(logs, p.mark); i >= 0 && (p.mark != "panic" || len(excerpts) == 0) {
			problems = append(problems, p.what)
			excerpts = append(excerpts, logs[i:min(len(logs), i+4000)])
		}
	}
	if len(problems) > 0 {
		if len(excerpts) == 0 {
			excerpts = append(excerpts, logs[max(0, len(logs)-4000):])
		}
		t.Fatalf("Caddy (pid %d) %s:\n%s", e.in.Pid(), strings.Join(problems, ", "), strings.Join(excerpts, "\n[...]\n"))
	}
}

// aliveWatch polls a process every 50 ms and records when it was first
// found gone.
type aliveWatch struct {
	died atomic.Int64 // unix nanoseconds; 0 while alive
	done chan struct{}
	once sync.Once
}

func watchAlive(pid int) *aliveWatch {
	w := &aliveWatch{done: make(chan struct{})}
	go func() {
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-w.done:
				return
			case <-tick.C:
				if syscall.Kill(pid, 0) != nil {
					w.died.Store(time.Now().UnixNano())
					return
				}
			}
		}
	}()
	return w
}

func (w *aliveWatch) diedAt() time.Time {
	if n := w.died.Load(); n != 0 {
		return time.Unix(0, n)
	}
	return time.Time{}
}

func (w *aliveWatch) stop() { w.once.Do(func() { close(w.done) }) }

// h2Conn is a raw HTTP/2 client connection: it sends only what a test tells
// it to (no WINDOW_UPDATE ever, unless asked), and answers SETTINGS and
// PING so that the server keeps the connection.
type h2Conn struct {
	conn      *tls.Conn
	fr        *http2.Framer
	authority string

	wmu    sync.Mutex // frame writes and the header encoder
	henc   *hpack.Encoder
	hbuf   bytes.Buffer
	nextID uint32

	mu      sync.Mutex
	streams map[uint32]*h2Stream
}

type h2Stream struct {
	path   string
	status string // :status of the response
	data   int    // DATA bytes received
	ended  bool   // END_STREAM or RST_STREAM from the server
	reset  bool   // RST_STREAM from the server
}

// dialH2 opens a connection whose streams start with a send window of
// window bytes for the server. A large window also opens the connection's
// own window, so that only the socket can stall the server.
func dialH2(t *testing.T, addr string, window uint32) *h2Conn {
	t.Helper()
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, h2TLS())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if p := conn.ConnectionState().NegotiatedProtocol; p != "h2" {
		t.Fatalf("negotiated %q, want h2", p)
	}
	c := &h2Conn{conn: conn, fr: http2.NewFramer(conn, conn), authority: addr, nextID: 1,
		streams: make(map[uint32]*h2Stream)}
	c.henc = hpack.NewEncoder(&c.hbuf)
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.write(t, func() error {
		if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
			return err
		}
		if err := c.fr.WriteSettings(
			http2.Setting{ID: http2.SettingEnablePush, Val: 0},
			http2.Setting{ID: http2.SettingInitialWindowSize, Val: window},
		); err != nil {
			return err
		}
		if window > 1<<20 {
			return c.fr.WriteWindowUpdate(0, 1<<31-1-65535)
		}
		return nil
	})
	return c
}

func (c *h2Conn) write(t *testing.T, f func() error) {
	t.Helper()
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_ = c.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if err := f(); err != nil {
		t.Fatalf("HTTP/2 write: %v", err)
	}
}

// get opens a GET stream on path and returns its id.
func (c *h2Conn) get(t *testing.T, path string) uint32 {
	t.Helper()
	var id uint32
	c.write(t, func() error {
		id = c.nextID
		c.nextID += 2
		c.mu.Lock()
		c.streams[id] = &h2Stream{path: path}
		c.mu.Unlock()
		c.hbuf.Reset()
		for _, f := range [][2]string{{":method", "GET"}, {":scheme", "https"}, {":authority", c.authority},
			{":path", path}, {"accept", "text/event-stream"}} {
			_ = c.henc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
		}
		return c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: c.hbuf.Bytes(),
			EndStream: true, EndHeaders: true})
	})
	return id
}

// rst cancels a stream from the client side.
func (c *h2Conn) rst(t *testing.T, id uint32) {
	t.Helper()
	c.write(t, func() error { return c.fr.WriteRSTStream(id, http2.ErrCodeCancel) })
}

// readFrame reads one frame and records what it says.
func (c *h2Conn) readFrame() error {
	f, err := c.fr.ReadFrame()
	if err != nil {
		return err
	}
	c.mu.Lock()
	st := c.streams[f.Header().StreamID]
	c.mu.Unlock()
	var reply func() error
	switch f := f.(type) {
	case *http2.SettingsFrame:
		if !f.IsAck() {
			reply = c.fr.WriteSettingsAck
		}
	case *http2.PingFrame:
		if !f.IsAck() {
			reply = func() error { return c.fr.WritePing(true, f.Data) }
		}
	case *http2.MetaHeadersFrame:
		if st != nil {
			c.mu.Lock()
			if s := f.PseudoValue("status"); s != "" {
				st.status = s
			}
			st.ended = st.ended || f.StreamEnded()
			c.mu.Unlock()
		}
	case *http2.DataFrame:
		if st != nil {
			c.mu.Lock()
			st.data += len(f.Data())
			st.ended = st.ended || f.StreamEnded()
			c.mu.Unlock()
		}
	case *http2.RSTStreamFrame:
		if st != nil {
			c.mu.Lock()
			st.ended, st.reset = true, true
			c.mu.Unlock()
		}
	case *http2.GoAwayFrame:
		return fmt.Errorf("GOAWAY %v", f.ErrCode)
	}
	if reply != nil {
		c.wmu.Lock()
		_ = c.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
		err = reply()
		c.wmu.Unlock()
	}
	return err
}

// readUntil reads frames on the calling goroutine until cond holds.
func (c *h2Conn) readUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	_ = c.conn.SetReadDeadline(time.Now().Add(d))
	defer c.conn.SetReadDeadline(time.Time{})
	for !c.holds(cond) {
		if err := c.readFrame(); err != nil {
			t.Fatalf("HTTP/2 connection, waiting for %s: %v", what, err)
		}
	}
}

func (c *h2Conn) holds(cond func() bool) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return cond()
}

// discard reads and drops every frame in the background until the
// connection ends, so that the server is stalled by flow control only.
func (c *h2Conn) discard() {
	go func() {
		for c.readFrame() == nil {
		}
	}()
}

// allOpen reports whether every stream got a 200 and its opening comment.
func (c *h2Conn) allOpen() bool {
	for _, s := range c.streams {
		if s.status != "200" || s.data == 0 || s.ended {
			return false
		}
	}
	return true
}

// pad is n bytes that are no SSE syntax.
func pad(n int) string { return strings.Repeat("x", n) }

// Contract 0a: HTTP/2 clients that never open their stream windows and
// reset streams while their queues overflow cannot crash Caddy or keep a
// stream: every one ends, the overflowed ones counted as such, and a fresh
// client is served afterwards.
func TestAbuseH2StalledWindowsAndResets(t *testing.T) {
	if testing.Short() {
		t.Skip("heavy: skipped with -short")
	}
	e := startAbuse(t)
	e.waitTLS(t)
	const conns = 4
	var cs []*h2Conn
	for range conns {
		c := dialH2(t, e.in.Addr(), 16)
		c.discard()
		cs = append(cs, c)
	}
	type ref struct {
		c  *h2Conn
		id uint32
	}
	var all []ref
	for i := range stalledStreams {
		c := cs[i%conns]
		all = append(all, ref{c, c.get(t, "/stall/abuse")})
	}
	ssetest.Wait(t, 30*time.Second, "every stalled stream answered 200 with its opening comment", func() bool {
		for _, c := range cs {
			if !c.holds(c.allOpen) {
				return false
			}
		}
		return true
	})
	e.waitMetric(t, "caddy_sse_streams_open", stalledStreams, 10*time.Second)
	ssetest.WaitNumsub(t, e.rs.Client(), "abuse", 1, 5*time.Second)
	overflowName := `caddy_sse_streams_closed_total{reason="overflow"}`
	overflowBefore := e.metric(t, overflowName)

	// Every queue (buffer 4) overflows: the first event is stuck in the
	// window, the next four queue, the sixth overflows. Every fourth stream
	// is reset by the client meanwhile, half of them before any event.
	rdb := e.rs.Client()
	reset := 0
	resetSome := func(phase int) {
		for i, r := range all {
			if i%8 == phase {
				r.c.rst(t, r.id)
				reset++
			}
		}
	}
	resetSome(0)
	for i := range 24 {
		if err := rdb.Publish(context.Background(), "abuse", fmt.Sprintf("%d %s", i, pad(1024))).Err(); err != nil {
			t.Fatal(err)
		}
		if i == 3 {
			resetSome(4)
		}
	}
	published := time.Now()
	e.waitMetric(t, "caddy_sse_streams_open", 0, abuseBound)
	e.waitUnsubscribed(t, abuseBound-time.Since(published), "abuse")
	overflowed := e.metric(t, overflowName) - overflowBefore
	t.Logf("%d streams on %d connections, %d reset by the client: all ended %v after the last publish, %v counted as overflow",
		stalledStreams, conns, reset, time.Since(published).Round(time.Millisecond), overflowed)
	if want := float64(stalledStreams - reset); overflowed < want {
		t.Errorf("streams closed for overflow grew by %v, want at least %v (the streams the client did not reset); metrics:\n%s",
			overflowed, want, ssetest.Lines(ssetest.Metrics(t, e.in.AdminURL()+"/metrics"), "caddy_sse_streams_closed"))
	}

	// A normal client is still served.
	s := e.h2Stream(t, "/stall/abuse")
	ssetest.WaitNumsub(t, rdb, "abuse", 1, 5*time.Second)
	if err := rdb.Publish(context.Background(), "abuse", "after the abuse").Err(); err != nil {
		t.Fatal(err)
	}
	ssetest.Expect(t, s, "after the abuse")
	e.check(t)
}

// bulkPublish publishes n events of size bytes on channel, numbered from 0,
// and checks after each that every reading client got it, in order.
func bulkPublish(t *testing.T, e *abuseEnv, channel string, n, size int, readers []*sseclient.Stream) {
	t.Helper()
	rdb := e.rs.Client()
	body := pad(size)
	for i := range n {
		if err := rdb.Publish(context.Background(), channel, fmt.Sprintf("%d %s", i, body)).Err(); err != nil {
			t.Fatal(err)
		}
		for k, s := range readers {
			ev, err := s.Next(10 * time.Second)
			if err != nil {
				e.check(t)
				t.Fatalf("reading client %d, event %d of %d: %v", k, i, n, err)
			}
			if !strings.HasPrefix(ev.Data, fmt.Sprintf("%d ", i)) || len(ev.Data) != len(body)+len(strconv.Itoa(i))+1 {
				t.Fatalf("reading client %d got event %.12q (%d bytes), want number %d", k, ev.Data, len(ev.Data), i)
			}
		}
	}
}

// Contract 0b: an HTTP/2 client that stops reading its socket (windows wide
// open, so only TCP stalls) loses its streams within writeTimeout + 10 s,
// its channels are unsubscribed, and clients on other connections get
// every event meanwhile.
func TestAbuseH2SocketNotRead(t *testing.T) {
	if testing.Short() {
		t.Skip("heavy: skipped with -short")
	}
	e := startAbuse(t)
	e.waitTLS(t)
	readers := []*sseclient.Stream{e.h2Stream(t, "/multi/fast1"), e.h2Stream(t, "/multi/fast2")}

	const stalled = 4
	c := dialH2(t, e.in.Addr(), 1<<31-1)
	var own []string
	for i := range stalled {
		own = append(own, fmt.Sprintf("stall%d", i))
		c.get(t, "/multi/"+own[i])
	}
	// Read until every stream is open, then never read again.
	c.readUntil(t, 20*time.Second, "the streams to open", c.allOpen)
	e.waitMetric(t, "caddy_sse_streams_open", stalled+2, 10*time.Second)
	ssetest.WaitNumsub(t, e.rs.Client(), own[0], 1, 5*time.Second)

	bulkPublish(t, e, "shared", 400, 16<<10, readers) // 6.4 MB a stream
	published := time.Now()
	e.waitMetric(t, "caddy_sse_streams_open", 2, abuseBound)
	e.waitUnsubscribed(t, abuseBound-time.Since(published), own...)
	t.Logf("the unread connection's %d streams ended %v after the last publish", stalled, time.Since(published).Round(time.Millisecond))
	bulkPublish(t, e, "shared", 3, 16, readers)
	e.check(t)
}

// rawStreamH1 sends a request by hand on a new TCP connection to the plain
// HTTP/1.1 site and reads the response head and the opening comment. A
// positive rcvbuf shrinks the socket's receive buffer first.
func rawStreamH1(t *testing.T, addr, request string, rcvbuf int) (net.Conn, *bufio.Reader) {
	t.Helper()
	d := net.Dialer{Timeout: 10 * time.Second}
	if rcvbuf > 0 {
		d.Control = func(_, _ string, c syscall.RawConn) error {
			return c.Control(func(fd uintptr) {
				_ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, rcvbuf)
			})
		}
	}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.WriteString(conn, request); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("response head: %v", err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %s", resp.Status)
	}
	if line, err := br.ReadString('\n'); err != nil || line != ":\n" {
		t.Fatalf("opening comment %q: %v", line, err)
	}
	_ = conn.SetDeadline(time.Time{})
	return conn, br
}

// Contract 0c: the same over HTTP/1.1 with takeover: a client that stops
// reading ends within writeTimeout + 10 s, and is counted as an overflow.
func TestAbuseH1SocketNotRead(t *testing.T) {
	if testing.Short() {
		t.Skip("heavy: skipped with -short")
	}
	e := startAbuse(t)
	readers := []*sseclient.Stream{openPlain(t, e, "/multi/fast1"), openPlain(t, e, "/multi/fast2")}
	rawStreamH1(t, e.plain, "GET /multi/stall HTTP/1.1\r\nHost: "+e.plain+"\r\nAccept: text/event-stream\r\n\r\n", 4096)
	e.waitMetric(t, "caddy_sse_streams_open", 3, 10*time.Second)
	ssetest.WaitNumsub(t, e.rs.Client(), "stall", 1, 5*time.Second)
	overflowName := `caddy_sse_streams_closed_total{reason="overflow"}`
	overflowBefore := e.metric(t, overflowName)

	bulkPublish(t, e, "shared", 400, 16<<10, readers)
	published := time.Now()
	e.waitMetric(t, "caddy_sse_streams_open", 2, abuseBound)
	e.waitUnsubscribed(t, abuseBound-time.Since(published), "stall")
	if got := e.metric(t, overflowName) - overflowBefore; got < 1 {
		t.Errorf("the unread stream ended but was not counted as overflow (overflow grew by %v); metrics:\n%s",
			got, ssetest.Lines(ssetest.Metrics(t, e.in.AdminURL()+"/metrics"), "caddy_sse_streams_closed"))
	}
	bulkPublish(t, e, "shared", 3, 16, readers)
	e.check(t)
}

func openPlain(t *testing.T, e *abuseEnv, path string) *sseclient.Stream {
	t.Helper()
	s, err := sseclient.Get(context.Background(), "http://"+e.plain+path)
	if err != nil {
		t.Fatalf("open %s: %v", path, err)
	}
	t.Cleanup(s.Close)
	return s
}

// Contract 5: bytes a client sends after its request cost no work per byte:
// past 64 KiB beyond the declared body the connection is closed. A POST
// stream with a body (fetch-event-source) is served as usual.
func TestAbuseBytesAfterRequest(t *testing.T) {
	if testing.Short() {
		t.Skip("heavy: skipped with -short")
	}
	e := startAbuse(t)
	conn, br := rawStreamH1(t, e.plain, "GET /stall/garbage HTTP/1.1\r\nHost: "+e.plain+"\r\nAccept: text/event-stream\r\n\r\n", 0)
	e.waitMetric(t, "caddy_sse_streams_open", 1, 10*time.Second)

	readEnd := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, br)
		readEnd <- err
	}()
	const total, chunk = 8 << 20, 4 << 10
	garbage := bytes.Repeat([]byte("garbage!"), chunk/8)
	sent := 0
	var werr error
	start := time.Now()
	_ = conn.SetWriteDeadline(start.Add(30 * time.Second))
	for sent < total && werr == nil {
		select {
		case err := <-readEnd:
			werr = fmt.Errorf("read side ended: %v", err)
			continue
		default:
		}
		var n int
		n, werr = conn.Write(garbage)
		sent += n
	}
	t.Logf("sent %d KiB after the request in %v, then: %v", sent>>10, time.Since(start).Round(time.Millisecond), werr)
	switch {
	case werr == nil:
		t.Errorf("the server took all %d MiB sent after the request without closing the connection", total>>20)
	case errors.Is(werr, os.ErrDeadlineExceeded):
		t.Errorf("the connection was still open after 30 s and %d KiB sent after the request", sent>>10)
	}
	conn.Close()
	e.waitMetric(t, "caddy_sse_streams_open", 0, 10*time.Second)

	// The legitimate case: a POST stream with a JSON body stays open and
	// receives events.
	body := `{"q":"` + pad(2048-8) + `"}`
	req, _ := http.NewRequest(http.MethodPost, "http://"+e.plain+"/stall/post", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	s, err := sseclient.Open(context.Background(), nil, req)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ssetest.WaitNumsub(t, e.rs.Client(), "post", 1, 5*time.Second)
	for i := range 6 {
		e.rs.Client().Publish(context.Background(), "post", fmt.Sprint("post ", i))
		if ev := ssetest.Next(t, s); ev.Data != fmt.Sprint("post ", i) {
			t.Fatalf("POST stream got %+v", ev)
		}
		time.Sleep(500 * time.Millisecond) // pacing only: the stream must stay open across it
	}
	e.check(t)
}

// resumePayload is event i of the replay tests: 100 KB, distinct per event.
func resumePayload(i int) string {
	head := fmt.Sprintf("event %04d ", i)
	return head + strings.Repeat(string(rune('a'+i%26)), 100_000-len(head))
}

// publishHistory publishes n resumable events on channel in pipelines and
// returns their ids.
func publishHistory(t *testing.T, e *abuseEnv, channel string, n int) []uint64 {
	t.Helper()
	rdb := e.rs.Client()
	waitFunctions(t, rdb)
	ctx := context.Background()
	var ids []uint64
	for from := 0; from < n; from += 50 {
		pipe := rdb.Pipeline()
		for i := from; i < min(n, from+50); i++ {
			pipe.FCall(ctx, "sse_publish", []string{channel}, resumePayload(i))
		}
		cmds, err := pipe.Exec(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range cmds {
			id, err := c.(interface{ Uint64() (uint64, error) }).Uint64()
			if err != nil {
				t.Fatal(err)
			}
			ids = append(ids, id)
		}
	}
	return ids
}

// throttled is a connection that reads at most rate bytes a second: a
// client on a slow link, reading steadily.
type throttled struct {
	net.Conn
	rate  float64
	start time.Time
	n     int64
}

func (c *throttled) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p[:min(len(p), 32<<10)])
	c.n += int64(n)
	time.Sleep(time.Until(c.start.Add(time.Duration(float64(c.n) / c.rate * float64(time.Second)))))
	return n, err
}

// slowClient is an HTTP client whose connections read at rate bytes a
// second.
func slowClient(t *testing.T, rate float64) *http.Client {
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &throttled{Conn: c, rate: rate, start: time.Now()}, nil
	}}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// Contract 4a: a client resuming from before the first of 1,000 events of
// 100 KB gets every one, in order, byte for byte, then the live ones. It
// reads steadily at 4 MiB/s (a mobile link), so the replay takes
// longer than writeTimeout: it must be written with backpressure, not in
// one write that has to finish within it.
func TestAbuseResumeLargeHistory(t *testing.T) {
	if testing.Short() {
		t.Skip("heavy: skipped with -short")
	}
	e := startAbuse(t)
	const events = 1000
	ids := publishHistory(t, e, "big", events)
	start := time.Now()
	req, _ := http.NewRequest(http.MethodGet, "http://"+e.plain+"/resume/big", nil)
	// 0 asks for everything retained: an id below the first one this Redis
	// issued would be unprovable (Redis may have lost what followed it) and
	// get sse-missed first.
	req.Header.Set("Last-Event-ID", "0")
	s, err := sseclient.Open(context.Background(), slowClient(t, 4<<20), req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	for i := range events {
		ev, err := s.Next(30 * time.Second)
		if err != nil {
			e.check(t)
			t.Fatalf("replayed event %d of %d, %v after the request: %v", i, events, time.Since(start).Round(time.Millisecond), err)
		}
		if ev.ID != strconv.FormatUint(ids[i], 10) || ev.Data != resumePayload(i) {
			t.Fatalf("replayed event %d: id %q (want %d), event %q, data %.20q... (%d bytes), want %.20q... (%d bytes)",
				i, ev.ID, ids[i], ev.Event, ev.Data, len(ev.Data), resumePayload(i), len(resumePayload(i)))
		}
	}
	t.Logf("replayed %d events of 100 KB in %v", events, time.Since(start).Round(time.Millisecond))
	live := e.rs.Client().FCall(context.Background(), "sse_publish", []string{"big"}, "live").Val()
	ev := ssetest.Next(t, s)
	if ev.Data != "live" || ev.ID != fmt.Sprint(live) {
		t.Fatalf("after the replay got %+v, want the live event %v", ev, live)
	}
	e.check(t)
}

// raceBuilt reports whether this test binary, and so the Caddy it runs, was
// built with the race detector.
func raceBuilt() bool {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "-race" {
				return s.Value == "true"
			}
		}
	}
	return false
}

// Contract 4b: five clients that resume from the start of a 100 MB history
// and never read cost Caddy at most 150 MiB: each holds at most its queue
// (buffer 16) and a page of history, never the whole history. The clients
// are watched for 15 s, not 5: the current code takes 4 s or more before
// its memory grows. With the race detector (whose shadow memory is counted
// in RSS) the budget is 2.5 times larger. Long: SSE_LONG=1 runs it.
func TestAbuseResumeMemoryBounded(t *testing.T) {
	if testing.Short() || !longLoad() {
		t.Skip("long: SSE_LONG=1 runs it (and never with -short)")
	}
	e := startAbuse(t)
	const events, clients = 1000, 5
	budgetMiB := int64(150)
	if raceBuilt() {
		budgetMiB = budgetMiB * 5 / 2
	}
	publishHistory(t, e, "mem", events)
	base := rssKiB(t, e.in.Pid())
	after := "0" // everything retained
	for range clients {
		conn, err := net.DialTimeout("tcp", e.plain, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		// The request, and then never a read.
		fmt.Fprintf(conn, "GET /resume/mem HTTP/1.1\r\nHost: %s\r\nLast-Event-ID: %s\r\n\r\n", e.plain, after)
	}
	var at5 int64
	peak, last := base, base
	start := time.Now()
	for time.Since(start) < 15*time.Second {
		e.check(t)
		last = rssKiB(t, e.in.Pid())
		peak = max(peak, last)
		if at5 == 0 && time.Since(start) >= 5*time.Second {
			at5 = last
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("Caddy RSS (race detector: %v): %d MiB before %d clients resumed %d events of 100 KB without reading; %d MiB after 5 s, %d MiB after 15 s, peak %d MiB (growth %d MiB, budget %d MiB)",
		raceBuilt(), base>>10, clients, events, at5>>10, last>>10, peak>>10, (peak-base)>>10, budgetMiB)
	if grown := (peak - base) >> 10; grown > budgetMiB {
		t.Errorf("Caddy's RSS grew by %d MiB, want at most %d MiB", grown, budgetMiB)
	}
	e.check(t)
}

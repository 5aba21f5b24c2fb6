package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// target is where streams are opened: an http:// or https:// URL template
// whose {ch} is replaced by the channel.
type target struct {
	scheme string // http or https
	addr   string // host:port to dial
	host   string // Host header
	path   string // path template with {ch}
}

func parseTarget(tmpl string) (target, error) {
	u, err := url.Parse(strings.ReplaceAll(tmpl, "{ch}", "CHANNEL"))
	if err != nil {
		return target{}, err
	}
	port := "80"
	switch u.Scheme {
	case "http":
	case "https":
		port = "443"
	default:
		return target{}, fmt.Errorf("only http:// and https:// are supported, got %q", u.Scheme)
	}
	if !strings.Contains(tmpl, "{ch}") {
		return target{}, fmt.Errorf("the URL has no {ch} for the channel")
	}
	addr := u.Host
	if u.Port() == "" {
		addr = net.JoinHostPort(u.Hostname(), port)
	}
	return target{scheme: u.Scheme, addr: addr, host: u.Host, path: strings.ReplaceAll(u.RequestURI(), "CHANNEL", "{ch}")}, nil
}

func (t target) url(channel string) string {
	return t.scheme + "://" + t.host + strings.ReplaceAll(t.path, "{ch}", url.PathEscape(channel))
}

// Protocols of the streams (-proto).
const (
	protoH1 = "h1" // HTTP/1.1 written and parsed by the tool, over TCP or TLS
	protoH2 = "h2" // HTTP/2 over TLS through net/http, one connection per stream
)

// checkProto returns the protocol for a target: proto, or when it is empty
// h1 for http:// and h2 for https://. HTTP/2 needs https:// (no h2c).
func checkProto(proto string, t target) (string, error) {
	switch proto {
	case "":
		if t.scheme == "https" {
			return protoH2, nil
		}
		return protoH1, nil
	case protoH1:
		return proto, nil
	case protoH2:
		if t.scheme != "https" {
			return "", fmt.Errorf("-proto h2 needs an https:// URL")
		}
		return proto, nil
	}
	return "", fmt.Errorf("-proto %q: want h1 or h2", proto)
}

// tlsConfig is the client's TLS configuration: the server's certificate is
// checked against the PEM roots of cafile, or not at all when insecure (the
// servers of a benchmark have self-signed or internal certificates).
func tlsConfig(cafile string, insecure bool) (*tls.Config, error) {
	cfg := &tls.Config{InsecureSkipVerify: insecure}
	if cafile != "" {
		pem, err := os.ReadFile(cafile)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s: no PEM certificate", cafile)
		}
		cfg.RootCAs = pool
	}
	return cfg, nil
}

// h2Transport returns the transport whose NewClientConn opens one HTTP/2
// connection per stream (never pooled, never shared), dialed through d.
func h2Transport(d *dialers, tlsConf *tls.Config, timeout time.Duration) *http.Transport {
	var p http.Protocols
	p.SetHTTP2(true)
	return &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return d.dial(ctx, addr)
		},
		TLSClientConfig:     tlsConf.Clone(),
		TLSHandshakeTimeout: timeout,
		Protocols:           &p,
		DisableCompression:  true,
	}
}

func (t target) request(channel string) []byte {
	path := strings.ReplaceAll(t.path, "{ch}", url.PathEscape(channel))
	return []byte("GET " + path + " HTTP/1.1\r\nHost: " + t.host +
		"\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n")
}

// dialers spreads connections over source addresses, round robin, so that
// more than one address's worth of ephemeral ports can be used.
type dialers struct {
	list []*net.Dialer
	next atomic.Uint64
}

// parseSources reads "127.0.0.2-127.0.0.254" (a range in the last octet), a
// comma-separated list, or "" for the kernel's choice.
func parseSources(s string) ([]net.IP, error) {
	if s == "" || s == "none" {
		return nil, nil
	}
	var ips []net.IP
	for _, part := range strings.Split(s, ",") {
		from, to, isRange := strings.Cut(strings.TrimSpace(part), "-")
		a := net.ParseIP(from).To4()
		if a == nil {
			return nil, fmt.Errorf("bad source address %q", from)
		}
		if !isRange {
			ips = append(ips, a)
			continue
		}
		b := net.ParseIP(to).To4()
		if b == nil || !a[:3].Equal(b[:3]) || b[3] < a[3] {
			return nil, fmt.Errorf("bad source range %q: the addresses must differ in the last octet only", part)
		}
		for i := int(a[3]); i <= int(b[3]); i++ {
			ips = append(ips, net.IPv4(a[0], a[1], a[2], byte(i)).To4())
		}
	}
	for _, ip := range ips {
		if !ip.IsLoopback() {
			return nil, fmt.Errorf("source %s is not a loopback address", ip)
		}
	}
	return ips, nil
}

func newDialers(ips []net.IP, timeout time.Duration) *dialers {
	d := &dialers{}
	for _, ip := range ips {
		d.list = append(d.list, &net.Dialer{Timeout: timeout, LocalAddr: &net.TCPAddr{IP: ip}})
	}
	if len(d.list) == 0 {
		d.list = append(d.list, &net.Dialer{Timeout: timeout})
	}
	return d
}

func (d *dialers) dial(ctx context.Context, addr string) (net.Conn, error) {
	i := d.next.Add(1) - 1
	return d.list[i%uint64(len(d.list))].DialContext(ctx, "tcp", addr)
}

// client opens streams and counts what they receive.
type client struct {
	tgt     target
	dialers *dialers
	base    time.Time // the clock of the send times in payloads
	bufSize int
	proto   string          // protoH1 or protoH2
	tlsConf *tls.Config     // https:// over h1
	h2      *http.Transport // h2: opens one connection per stream

	latency   histogram // publish to receipt, microseconds
	delivered atomic.Int64
	unstamped atomic.Int64 // events without a send time of this run
	connected atomic.Int64
	failed    atomic.Int64
	lost      atomic.Int64 // streams the server ended or broke
	closing   atomic.Bool

	mu       sync.Mutex
	conns    []io.Closer
	firstErr error
	readers  sync.WaitGroup
}

// now is the tool's clock: nanoseconds since base, monotonic.
func (c *client) now() int64 { return int64(time.Since(c.base)) }

// open connects one stream to channel and reads its response head. The
// returned reader holds whatever body bytes came with the head; closing the
// returned closer ends the stream and its connection.
func (c *client) open(ctx context.Context, channel string, timeout time.Duration) (io.Closer, *bufio.Reader, head, error) {
	if c.proto == protoH2 {
		return c.openH2(ctx, channel, timeout)
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	conn, err := c.dialers.dial(ctx, c.tgt.addr)
	if err != nil {
		return nil, nil, head{}, err
	}
	if c.tgt.scheme == "https" {
		cfg := c.tlsConf.Clone()
		cfg.NextProtos = []string{"http/1.1"}
		tc := tls.Client(conn, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			conn.Close()
			return nil, nil, head{}, err
		}
		conn = tc
	}
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if _, err := conn.Write(c.tgt.request(channel)); err != nil {
		conn.Close()
		return nil, nil, head{}, err
	}
	br := bufio.NewReaderSize(conn, c.bufSize)
	h, err := readHead(br)
	if err != nil {
		conn.Close()
		return nil, nil, head{}, err
	}
	_ = conn.SetDeadline(time.Time{})
	return conn, br, h, nil
}

// h2Stream is one HTTP/2 stream on a connection of its own.
type h2Stream struct {
	cc     *http.ClientConn
	body   io.ReadCloser
	cancel context.CancelFunc
}

func (s *h2Stream) Close() error {
	s.cancel()
	if s.body != nil {
		s.body.Close()
	}
	return s.cc.Close()
}

// openH2 opens a TLS connection, negotiates HTTP/2 and sends the stream's
// GET on it. The request's context lives as long as the stream (a response
// body ends with its request's context), so the head's timeout is a timer.
func (c *client) openH2(ctx context.Context, channel string, timeout time.Duration) (io.Closer, *bufio.Reader, head, error) {
	dctx, dcancel := context.WithTimeout(ctx, timeout)
	defer dcancel()
	cc, err := c.h2.NewClientConn(dctx, "https", c.tgt.addr)
	if err != nil {
		return nil, nil, head{}, err
	}
	sctx, cancel := context.WithCancel(context.Background())
	s := &h2Stream{cc: cc, cancel: cancel}
	req, err := http.NewRequestWithContext(sctx, http.MethodGet, c.tgt.url(channel), nil)
	if err != nil {
		s.Close()
		return nil, nil, head{}, err
	}
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Cache-Control", "no-cache")
	timer := time.AfterFunc(timeout, cancel)
	resp, err := cc.RoundTrip(req)
	if !timer.Stop() && err == nil {
		err = fmt.Errorf("no response head within %s", timeout)
	}
	if err != nil {
		if resp != nil {
			resp.Body.Close()
		}
		s.Close()
		return nil, nil, head{}, err
	}
	s.body = resp.Body
	switch {
	case resp.StatusCode != http.StatusOK:
		err = errStatus{resp.StatusCode}
	case resp.ProtoMajor != 2:
		err = fmt.Errorf("the server answered with %s, not HTTP/2", resp.Proto)
	}
	if err != nil {
		s.Close()
		return nil, nil, head{}, err
	}
	return s, bufio.NewReaderSize(resp.Body, c.bufSize), head{status: resp.StatusCode}, nil
}

// readHead reads the status line and headers.
func readHead(br *bufio.Reader) (head, error) {
	var h head
	first := true
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			// A header longer than the buffer: none we need; skip it.
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = br.ReadSlice('\n')
			}
			if err != nil {
				return h, err
			}
			continue
		}
		if err != nil {
			return h, err
		}
		if first {
			first = false
			if h.status, err = parseStatusLine(line); err != nil {
				return h, err
			}
			continue
		}
		if len(line) <= 2 && (len(line) == 1 || line[0] == '\r') {
			if h.status != 200 {
				return h, errStatus{h.status}
			}
			return h, nil
		}
		if headerChunked(line) {
			h.chunked = true
		}
	}
}

// stream opens a stream and, once it is open, reads it on the calling
// goroutine until it ends. opened is called once the open succeeded or
// failed.
func (c *client) stream(ctx context.Context, channel string, timeout time.Duration, opened func(ok bool)) {
	conn, br, h, err := c.open(ctx, channel, timeout)
	if err != nil {
		c.failed.Add(1)
		c.mu.Lock()
		if c.firstErr == nil {
			c.firstErr = err
		}
		c.mu.Unlock()
		opened(false)
		return
	}
	c.mu.Lock()
	if c.closing.Load() {
		// The open phase is over: a late stream is not counted.
		c.mu.Unlock()
		conn.Close()
		c.failed.Add(1)
		opened(false)
		return
	}
	c.conns = append(c.conns, conn)
	c.readers.Add(1)
	c.mu.Unlock()
	c.connected.Add(1)
	opened(true)
	defer c.readers.Done()
	c.read(br, h)
}

// read counts the events of one stream until it ends. It reads straight out
// of the bufio.Reader's buffer: no other buffer per stream.
func (c *client) read(br *bufio.Reader, h head) {
	d := dechunker{chunked: h.chunked}
	p := eventParser{onEvent: c.event}
	out := p.feed
	for {
		n := br.Buffered()
		if n == 0 {
			if _, err := br.Peek(1); err != nil {
				if !c.closing.Load() {
					c.lost.Add(1)
				}
				return
			}
			n = br.Buffered()
		}
		b, _ := br.Peek(n)
		d.feed(b, out)
		_, _ = br.Discard(n)
		if d.done || d.bad {
			if !c.closing.Load() {
				c.lost.Add(1)
			}
			return
		}
	}
}

func (c *client) event(sent int64) {
	now := c.now()
	if sent < 0 || sent > now {
		c.unstamped.Add(1)
		return
	}
	c.delivered.Add(1)
	c.latency.Record(uint64((now - sent) / int64(time.Microsecond)))
}

// closeAll closes every stream and waits up to timeout for the readers.
func (c *client) closeAll(timeout time.Duration) {
	c.mu.Lock()
	c.closing.Store(true)
	conns := c.conns
	c.conns = nil
	c.mu.Unlock()
	for _, conn := range conns {
		conn.Close()
	}
	done := make(chan struct{})
	go func() { c.readers.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(timeout):
	}
}

// connectOnce opens a stream, waits for its head and closes it.
func (c *client) connectOnce(ctx context.Context, channel string, timeout time.Duration) error {
	conn, _, _, err := c.open(ctx, channel, timeout)
	if err != nil {
		return err
	}
	return conn.Close()
}

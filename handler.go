package caddysse

import (
	"context"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/caddy-sse/caddy-sse/registry"
	"github.com/caddy-sse/caddy-sse/sse"
)

// openStreams counts the streams of this process, across config reloads, for
// max_connections.
var openStreams atomic.Int64

const (
	// writeTimeout bounds one write to a client that stopped reading; its
	// queue overflows meanwhile and the stream is closed.
	writeTimeout = 10 * time.Second
	// stallGrace is how long past writeTimeout a write may stay blocked
	// before the stream is given up and its connection closed: over
	// HTTP/2 the reset that the write deadline queues cannot reach a
	// client that does not read its socket at all.
	stallGrace = 5 * time.Second
	// exitJitter spreads the reconnects of streams ended by a shutdown.
	exitJitter = 500 * time.Millisecond
	// replayTimeout bounds the read of one page of history.
	replayTimeout = 10 * time.Second
)

// Reasons a stream ends besides the registry's, also metric labels.
const (
	reasonClient      = "client"       // the client went away or stopped reading
	reasonMaxDuration = "max_duration" // max_duration was reached
	reasonExpired     = "token_expired"
	reasonShutdown    = "shutdown"
)

// ServeHTTP resolves the request's channels, admits it, attaches it to the
// registry, replays what the client missed and writes events until the
// client goes, the stream must end, or Caddy exits.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Method != http.MethodGet && r.Method != http.MethodPost {
		w.Header().Set("Allow", "GET, POST")
		return refuse(w, http.StatusMethodNotAllowed, "method", "method not allowed: use GET or POST")
	}
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	// Authentication comes before the channels resolve: the token's subject
	// may name them ({sse.jwt.sub}), and a client without a valid token
	// learns nothing about them.
	g, status, reason := h.authenticate(r, repl)
	if status != 0 {
		return h.refuseAuth(w, status, reason)
	}
	channels, status, reason := h.resolve(repl)
	if status != 0 {
		h.logger.Debug("stream refused", zap.Int("status", status), zap.String("reason", reason),
			zap.Strings("channels", channels))
		return refuse(w, status, "channels", reason)
	}
	if status, reason := h.authorize(g, channels); status != 0 {
		return h.refuseAuth(w, status, reason)
	}
	identity, ierr := h.identity(repl)
	if ierr != nil {
		return refuseIdentity(w, ierr)
	}
	if n := openStreams.Add(1); h.MaxConnections > 0 && n > int64(h.MaxConnections) {
		openStreams.Add(-1)
		w.Header().Set("Retry-After", strconv.Itoa(1+rand.IntN(5)))
		return refuse(w, http.StatusServiceUnavailable, "max_connections", "too many streams; retry later")
	}
	adm := &admission{}
	defer adm.releaseUnlessHandedOver()
	adm.add(func() { openStreams.Add(-1) })

	if h.format == sse.FormatEnvelope {
		// A publisher ended these channels: serve the others, and tell
		// EventSource to stop reconnecting (204) when none is left.
		if channels = h.hub.openChannels(r.Context(), channels); len(channels) == 0 {
			metrics.streamsRejected.WithLabelValues("closed").Inc()
			w.WriteHeader(http.StatusNoContent)
			return nil
		}
	}

	history := h.History.retention().MaxLen > 0
	var from registry.EventID
	if history {
		from = registry.ParseEventID(lastEventID(r))
		if !from.Valid() && h.LastEventID != "" && repl != nil {
			from = registry.ParseEventID(repl.ReplaceAll(h.LastEventID, ""))
		}
	}
	resume := h.hub.reg.Resumes(from)

	sub := registry.NewSubscriber(channels, h.format, h.Buffer, history)
	if resume {
		sub.Replaying()
	}
	var d *detached
	if h.detach && r.ProtoMajor == 1 {
		d = newDetached(h, sub, channels)
	}
	releasePer, ok := h.admitPer(repl, sub)
	if !ok {
		w.Header().Set("Retry-After", strconv.Itoa(1+rand.IntN(5)))
		return refuse(w, http.StatusTooManyRequests, "max_connections_per", "too many streams for this client")
	}
	adm.add(releasePer)
	if err := h.hub.reg.Attach(r.Context(), sub); err != nil {
		return nil // the client went away, or the config is being unloaded
	}
	adm.add(func() { h.hub.reg.Detach(sub) })
	cur := h.hub.reg.Cursor(sub, from)

	setHeaders(w.Header())
	metrics.streamsOpen.Inc()
	adm.add(metrics.streamsOpen.Dec)
	life, unpresence := h.opened(channels, identity)
	if unpresence != nil {
		adm.add(unpresence)
	}
	end := h.streamEnd(g)
	h.logger.Debug("stream open", zap.Strings("channels", channels), zap.Bool("resume", resume),
		zap.Bool("takeover", d != nil))
	if d != nil {
		d.release, d.life = adm.release, life
		if d.takeOver(w, r, h.head(), cur, resume, from, end) {
			adm.handOver()
			return nil
		}
	}
	st := &stream{h: h, w: w, rc: http.NewResponseController(w), sub: sub, cur: cur, wake: sub.Wake(),
		channels: channels, adm: adm, life: life}
	if d != nil {
		st.wake = d.fallback
		st.headerSent = true // by the takeover that fell back
	}
	if c, ok := r.Context().Value(connKey{}).(net.Conn); ok {
		st.conn = c
	}
	st.stall = time.AfterFunc(time.Hour, st.abandon)
	st.stall.Stop()
	if err := st.open(); err != nil {
		st.finish(st.failed())
		return nil
	}
	if resume {
		if err := h.replay(r.Context(), sub, cur, from, st.writeBatches); err != nil {
			st.finish(st.failed())
			return nil
		}
	}
	why := st.run(r.Context(), end)
	if why == registry.ReasonEvicted {
		// Tell the page, so that it closes its EventSource rather than
		// reconnect and evict the next oldest stream of its key in turn.
		_ = st.write(evictedFrame)
	}
	st.finish(why)
	return nil
}

// admission is what a stream holds from being admitted: released once, when
// the stream ends, by whoever ends it first (the handler, a stall watchdog,
// or a taken-over stream's writer long after the handler returned).
type admission struct {
	mu         sync.Mutex
	undo       []func()
	released   bool
	handedOver bool
}

func (a *admission) add(f func()) {
	a.mu.Lock()
	a.undo = append(a.undo, f)
	a.mu.Unlock()
}

// release undoes the admission in reverse order, once.
func (a *admission) release() {
	a.mu.Lock()
	undo := a.undo
	a.undo, a.released = nil, true
	a.mu.Unlock()
	for i := len(undo) - 1; i >= 0; i-- {
		undo[i]()
	}
}

// handOver marks the stream as taken over: its release is the writer's.
func (a *admission) handOver() {
	a.mu.Lock()
	a.handedOver = true
	a.mu.Unlock()
}

func (a *admission) releaseUnlessHandedOver() {
	a.mu.Lock()
	h := a.handedOver
	a.mu.Unlock()
	if !h {
		a.release()
	}
}

// streamEnd is when the stream must end and why: max_duration (less up to
// 10% jitter, so that streams opened together do not all reconnect
// together), or the expiry of the token that admitted it (less a little
// jitter, so that the client reconnects with a fresh one before it is
// refused). Zero time: never.
func (h *Handler) streamEnd(g *grant) streamDeadline {
	var end streamDeadline
	now := time.Now()
	if d := time.Duration(h.MaxDuration); d > 0 {
		end = streamDeadline{at: now.Add(d - time.Duration(rand.Int64N(int64(d/10)+1))), why: reasonMaxDuration}
	}
	if g != nil && !g.expires.IsZero() {
		left := g.expires.Sub(now)
		jitter := min(left/10, 5*time.Second)
		at := g.expires.Add(-time.Duration(rand.Int64N(int64(max(jitter, 0)) + 1)))
		if end.at.IsZero() || at.Before(end.at) {
			end = streamDeadline{at: at, why: reasonExpired}
		}
	}
	return end
}

// streamDeadline is when a stream must end, and the reason it ends for.
type streamDeadline struct {
	at  time.Time
	why string
}

// resolve expands the channel templates (see expandChannels). It returns
// the channels, or a status and reason when the request must be refused.
func (h *Handler) resolve(repl *caddy.Replacer) ([]string, int, string) {
	var channels []string
	for i, tmpl := range h.Channels {
		names, err := expandChannels(repl, tmpl, h.listTemplate[i])
		if err != nil {
			ce := err.(*channelError)
			return channels, ce.status, ce.reason
		}
		for _, c := range names {
			if !contains(channels, c) {
				channels = append(channels, c)
			}
		}
	}
	switch {
	case len(channels) == 0:
		return nil, http.StatusBadRequest, "no channel"
	case len(channels) > h.MaxChannels:
		return channels, http.StatusBadRequest, "too many channels"
	}
	if h.allow != nil {
		for _, c := range channels {
			if !h.allow.MatchString(c) {
				return channels, http.StatusForbidden, "channel not allowed"
			}
		}
	}
	return channels, 0, ""
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// lastEventID reads the resume point: the Last-Event-ID header a browser
// sends on reconnect, or the lastEventId query parameter for a first page
// load. An id that is not one of ours is ignored (registry.ParseEventID).
func lastEventID(r *http.Request) string {
	v := r.Header.Get("Last-Event-ID")
	if v == "" {
		v = r.URL.Query().Get("lastEventId")
	}
	return v
}

// refuse answers before the stream opens, with a short plain-text reason.
func refuse(w http.ResponseWriter, status int, label, reason string) error {
	metrics.streamsRejected.WithLabelValues(label).Inc()
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = w.Write([]byte(reason + "\n"))
	return nil
}

// setHeaders sets the stream's response headers.
func setHeaders(hdr http.Header) {
	hdr.Set("Content-Type", "text/event-stream; charset=utf-8")
	hdr.Set("Cache-Control", "no-cache")
	hdr.Set("X-Accel-Buffering", "no")
	hdr.Del("Content-Length")
}

// head is what a stream starts with: the opening comment, and the retry
// hint when set.
func (h *Handler) head() []byte {
	buf := append([]byte(nil), sse.Comment...)
	if h.Retry > 0 {
		buf = sse.AppendRetry(buf, time.Duration(h.Retry).Milliseconds())
	}
	return buf
}

// Replay pages: the first page reads this many events per channel, later
// ones as many as make about replayPageBytes, so that a resuming stream
// holds a bounded amount of history however large the events are.
const (
	replayFirstPage = 16
	replayPageBytes = 512 << 10
	replayMinPage   = 4
	replayMaxPage   = 512
)

// replay writes the history of sub's channels after cur's positions (the
// client's Last-Event-ID, from), one page at a time: a page is written
// (write blocks on a slow client) before the next is read, and cur moves
// on with what is written. Live frames queue meanwhile; the resumable ones
// that find the queue full are read from history instead (see
// Subscriber.Replaying). A close found in history ends that channel of the
// stream.
func (h *Handler) replay(ctx context.Context, sub *registry.Subscriber, cur *registry.Cursor, from registry.EventID, write func(bufs [][]byte, events int) error) error {
	channels := sub.Channels()
	count := int64(replayFirstPage)
	missed := false
	var closed []string
	var frames []*registry.Frame
	var bufs [][]byte
	for {
		pctx, cancel := context.WithTimeout(ctx, replayTimeout)
		page, err := h.hub.reg.ReplayPage(pctx, cur, count)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				sub.AbortReplay()
				return ctx.Err()
			}
			// Serve the live stream anyway and tell the client what it
			// may have missed rather than end it while Redis is out.
			h.logger.Warn("history replay failed", zap.Strings("channels", channels), zap.Error(err))
			page = registry.Page{Truncated: true}
		}
		frames = frames[:0]
		if page.Truncated && !missed {
			missed = true
			frames = append(frames, registry.MissedFrameAfter(from))
		}
		size, done := 0, false
		for _, m := range page.Messages {
			if contains(closed, m.Channel) {
				cur.Advance(&registry.Frame{Channel: m.Channel, Seq: m.Seq}) // read past it
				continue
			}
			size += len(m.Payload)
			f := h.hub.reg.Encode(h.format, true, m)
			frames = append(frames, f)
			if f.Close {
				closed = append(closed, m.Channel)
				if done = h.hub.reg.Leave(sub, m.Channel); done {
					break
				}
			}
		}
		var events int
		bufs, events, _ = cur.AppendWire(bufs[:0], frames)
		if werr := write(bufs, events); werr != nil {
			sub.AbortReplay()
			return werr
		}
		clear(frames)
		clear(bufs)
		if err != nil || done {
			sub.AbortReplay()
			return nil
		}
		if n := len(page.Messages); n > 0 {
			count = min(max(int64(replayPageBytes/max(size/n, 1)/len(channels)), replayMinPage), replayMaxPage)
		}
		if !page.More && sub.EndReplay() {
			return nil
		}
	}
}

// stream writes one client's events through Caddy's response writer: HTTP/2,
// HTTP/3, and HTTP/1.x when it is not taken over.
type stream struct {
	h        *Handler
	w        http.ResponseWriter
	rc       *http.ResponseController
	sub      *registry.Subscriber
	channels []string
	adm      *admission
	life     *streamLife      // lifecycle entries; nil without
	cur      *registry.Cursor // what was written: later duplicates are skipped
	wake     <-chan struct{}
	frames   []*registry.Frame
	bufs     [][]byte

	// conn is the client's connection when Caddy's server lets us see it;
	// stall closes it when a write stays blocked (see stallGrace).
	conn  net.Conn
	stall *time.Timer
	ended sync.Once

	headerSent bool
	started    time.Time
	// Written, for the record of the stream's end, which the stall
	// watchdog may make while a write is under way.
	events atomic.Int64
	bytes  atomic.Int64
}

// open sends the headers and the first comment at once, so that the client
// (and every proxy on the way) sees the stream is alive before any event.
func (st *stream) open() error {
	st.started = time.Now()
	if !st.headerSent {
		st.w.WriteHeader(http.StatusOK)
	}
	// A stream outlives any server read or write timeout.
	_ = st.rc.SetReadDeadline(time.Time{})
	return st.write(st.h.head())
}

// write writes chunks and flushes, with a deadline so that a client that
// stopped reading cannot hold the goroutine forever.
func (st *stream) write(chunks ...[]byte) error {
	st.begin()
	defer st.done()
	for _, b := range chunks {
		if _, err := st.w.Write(b); err != nil {
			return err
		}
	}
	return st.rc.Flush()
}

// begin and done bracket every write: the write deadline bounds it, and the
// stall watchdog gives the stream up if even that cannot end it.
func (st *stream) begin() {
	_ = st.rc.SetWriteDeadline(time.Now().Add(writeTimeout))
	st.stall.Reset(writeTimeout + stallGrace)
}

func (st *stream) done() {
	st.stall.Stop()
	_ = st.rc.SetWriteDeadline(time.Time{})
}

// abandon runs on the watchdog's goroutine when a write stayed blocked past
// its deadline: it never touches the response writer (the handler's
// goroutine is inside it), it ends the stream's admission and closes the
// connection, which is what unblocks the handler.
func (st *stream) abandon() {
	defer recoverStream(st.h.logger, nil)
	st.finish(st.failed())
	if st.conn != nil {
		_ = st.conn.Close()
	}
}

// failed is why a stream whose write failed ended: the client fell behind
// (its queue overflowed while the write was blocked), or went away.
func (st *stream) failed() string {
	if st.sub.Reason() == registry.ReasonOverflow {
		return registry.ReasonOverflow
	}
	return reasonClient
}

// finish ends the stream once: the admission is undone and the end counted.
func (st *stream) finish(why string) {
	st.ended.Do(func() {
		st.adm.release()
		streamEnded(st.h.logger, why, st.channels, st.started, st.events.Load(), st.bytes.Load(), false)
		st.life.closed(why)
	})
}

// streamEnded counts a stream's end and records it, once per stream, with
// what the access log cannot know: it logs the request when the stream
// starts (a taken-over one) or cannot say why it ended.
func streamEnded(logger *zap.Logger, why string, channels []string, started time.Time, events, bytes int64, takeover bool) {
	metrics.streamsClosed.WithLabelValues(why).Inc()
	if ce := logger.Check(zap.InfoLevel, "stream closed"); ce != nil {
		ce.Write(zap.Strings("channels", channels), zap.String("reason", why),
			zap.Duration("duration", time.Since(started)), zap.Int64("events", events),
			zap.Int64("bytes", bytes), zap.Bool("takeover", takeover))
	}
}

// writeBatches writes bufs (events of them), flushing every few dozen.
func (st *stream) writeBatches(bufs [][]byte, events int) error {
	const batch = 64
	size := 0
	for len(bufs) > 0 {
		n := min(batch, len(bufs))
		if err := st.write(bufs[:n]...); err != nil {
			return err
		}
		for _, b := range bufs[:n] {
			size += len(b)
		}
		bufs = bufs[n:]
	}
	st.count(events, size)
	return nil
}

// run is the stream's loop: it sleeps until frames are queued, a keepalive
// is due, or the stream must end, and returns why it ended.
func (st *stream) run(ctx context.Context, end streamDeadline) string {
	keepalive := time.NewTimer(time.Duration(st.h.Keepalive))
	defer keepalive.Stop()
	var deadline <-chan time.Time
	if !end.at.IsZero() {
		t := time.NewTimer(time.Until(end.at))
		defer t.Stop()
		deadline = t.C
	}
	for {
		select {
		case <-st.wake:
			why, err := st.drain()
			if err != nil {
				return st.failed()
			}
			if why != "" {
				return why
			}
			keepalive.Reset(time.Duration(st.h.Keepalive))
		case <-keepalive.C:
			if st.write(sse.Comment) != nil {
				return st.failed()
			}
			keepalive.Reset(time.Duration(st.h.Keepalive))
		case <-ctx.Done():
			return reasonClient
		case <-deadline:
			return end.why
		case <-exiting:
			// Spread the reconnects, but stay prompt: Caddy waits for us.
			select {
			case <-time.After(time.Duration(rand.Int64N(int64(exitJitter)))):
			case <-ctx.Done():
			}
			return reasonShutdown
		}
	}
}

// drain writes every queued frame in one flush.
func (st *stream) drain() (string, error) {
	frames, why := st.sub.Take(st.frames)
	st.frames = frames
	if len(frames) == 0 || why == registry.ReasonOverflow {
		// An overflowed client resumes from history on reconnect; what is
		// queued would only be written to a socket that is not read.
		clear(frames)
		return why, nil
	}
	st.begin()
	defer st.done()
	// What the replay sent already is skipped; with ids per channel the
	// stream's own id line follows each resumable event.
	bufs, n, size := st.cur.AppendWire(st.bufs[:0], frames)
	st.bufs = bufs
	for _, b := range bufs {
		if _, err := st.w.Write(b); err != nil {
			clear(frames)
			clear(bufs)
			return why, err
		}
	}
	clear(frames) // let the frames go; the slice is reused
	clear(bufs)
	err := st.rc.Flush()
	st.count(n, size)
	return why, err
}

// count records n events of size bytes written.
func (st *stream) count(n, size int) {
	st.events.Add(int64(n))
	st.bytes.Add(int64(size))
	metrics.delivered.Add(float64(n))
}

// recoverStream, deferred in a goroutine that serves one stream, keeps a
// panic there from taking the whole process down: it is logged with its
// stack and the stream ends.
func recoverStream(logger *zap.Logger, end func()) {
	v := recover()
	if v == nil {
		return
	}
	logger.Error("stream goroutine panicked; ending the stream", zap.Any("panic", v), zap.Stack("stack"))
	if end != nil {
		end()
	}
}

// connKey holds, in a request's context, the client connection it came on:
// Caddy's servers hand it to the ConnContext hooks that modules register.
type connKey struct{}

// registerConnContext makes the connection of each request of srv visible
// to the streams, so that one whose writes stall can be cut off.
func registerConnContext(srv *caddyhttp.Server) {
	srv.RegisterConnContext(func(ctx context.Context, c net.Conn) context.Context {
		if ctx.Value(connKey{}) != nil {
			return ctx
		}
		return context.WithValue(ctx, connKey{}, c)
	})
}

package caddysse

import (
	"context"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
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
	// exitJitter spreads the reconnects of streams ended by a shutdown.
	exitJitter = 500 * time.Millisecond
	// replayTimeout bounds the history read of a resuming stream.
	replayTimeout = 10 * time.Second
)

// ServeHTTP resolves the request's channels, admits it, attaches it to the
// registry and writes events until the client goes, the stream must end, or
// Caddy exits.
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
	if n := openStreams.Add(1); h.MaxConnections > 0 && n > int64(h.MaxConnections) {
		openStreams.Add(-1)
		w.Header().Set("Retry-After", strconv.Itoa(1+rand.IntN(5)))
		return refuse(w, http.StatusServiceUnavailable, "max_connections", "too many streams; retry later")
	}
	// What undoes the admission runs when the stream ends: at return, or
	// later for a detached stream, which outlives this call.
	var undo []func()
	release := func() {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}
	handedOver := false
	defer func() {
		if !handedOver {
			release()
		}
	}()
	undo = append(undo, func() { openStreams.Add(-1) })

	if h.format == sse.FormatEnvelope && h.hub.closed(r.Context(), channels) {
		// A publisher ended this channel: 204 tells EventSource to stop
		// reconnecting.
		metrics.streamsRejected.WithLabelValues("closed").Inc()
		w.WriteHeader(http.StatusNoContent)
		return nil
	}

	history := h.History.retention().MaxLen > 0
	after, resume := uint64(0), false
	if history {
		after, resume = lastEventID(r)
		if !resume && h.LastEventID != "" && repl != nil {
			after, resume = parseEventID(repl.ReplaceAll(h.LastEventID, ""))
		}
	}

	sub := registry.NewSubscriber(channels, h.format, h.Buffer, history)
	rc := http.NewResponseController(w)
	st := &stream{h: h, w: w, rc: rc, sub: sub, lastSeq: after, wake: sub.Wake()}
	var d *detached
	if h.detach && r.ProtoMajor == 1 {
		// The subscriber outlives this call once detached: what it holds
		// must not keep the request (and net/http's buffers) alive.
		d = newDetached(h, sub, channels, after, rc)
		st.wake = d.fallback
	} else {
		// A client that stopped reading blocks the write; when its queue
		// overflows, cut the write short instead of waiting for writeTimeout.
		sub.OnOverflow(func() { _ = rc.SetWriteDeadline(time.Now()) })
	}
	releasePer, ok := h.admitPer(repl, sub)
	if !ok {
		w.Header().Set("Retry-After", strconv.Itoa(1+rand.IntN(5)))
		return refuse(w, http.StatusTooManyRequests, "max_connections_per", "too many streams for this client")
	}
	undo = append(undo, releasePer)
	if err := h.hub.reg.Attach(r.Context(), sub); err != nil {
		return nil // the client went away, or the config is being unloaded
	}
	undo = append(undo, func() { h.hub.reg.Detach(sub) })

	// History is read before the 200 so that the whole answer is decided
	// before the client sees it; live frames queue meanwhile.
	var replay [][]byte
	if resume {
		ctx, cancel := context.WithTimeout(r.Context(), replayTimeout)
		msgs, truncated, err := h.hub.reg.Replay(ctx, channels, after)
		cancel()
		if err != nil {
			// Serve the live stream anyway and tell the client what it
			// may have missed rather than refusing it while Redis is out.
			h.logger.Warn("history replay failed", zap.Strings("channels", channels), zap.Error(err))
			truncated = true
		}
		replay = st.replayFrames(msgs, truncated, after)
	}

	setHeaders(w.Header())
	metrics.streamsOpen.Inc()
	undo = append(undo, metrics.streamsOpen.Dec)
	h.logger.Debug("stream open", zap.Strings("channels", channels), zap.Bool("resume", resume),
		zap.Bool("detached", d != nil))
	if d != nil {
		d.release = release
		d.lastSeq = st.lastSeq
		if d.takeOver(w, r, rc, st.head(), replay) {
			handedOver = true
			return nil
		}
	}
	if err := st.open(); err != nil {
		metrics.streamsClosed.WithLabelValues("client").Inc()
		return nil
	}
	if err := st.writeBatches(replay); err != nil {
		metrics.streamsClosed.WithLabelValues("client").Inc()
		return nil
	}
	why := st.run(r.Context())
	if why == registry.ReasonEvicted {
		// Tell the page, so that it closes its EventSource rather than
		// reconnect and evict the next oldest stream of its key in turn.
		_ = st.write(evictedFrame)
	}
	metrics.streamsClosed.WithLabelValues(why).Inc()
	h.logger.Debug("stream closed", zap.Strings("channels", channels), zap.String("reason", why))
	return nil
}

// resolve expands the channel templates. It returns the channels, or a
// status and reason when the request must be refused.
func (h *Handler) resolve(repl *caddy.Replacer) ([]string, int, string) {
	var channels []string
	for _, tmpl := range h.Channels {
		v := tmpl
		if repl != nil {
			// A template with an empty or unknown placeholder names no
			// channel: "user:" must not become a channel every anonymous
			// client shares.
			var err error
			if v, err = repl.ReplaceOrErr(tmpl, true, true); err != nil {
				continue
			}
		}
		for _, c := range strings.Split(v, ",") {
			c = strings.TrimSpace(c)
			if c == "" || contains(channels, c) {
				continue
			}
			channels = append(channels, c)
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
// load. An id that is not one of ours is ignored.
func lastEventID(r *http.Request) (uint64, bool) {
	v := r.Header.Get("Last-Event-ID")
	if v == "" {
		v = r.URL.Query().Get("lastEventId")
	}
	return parseEventID(v)
}

func parseEventID(v string) (uint64, bool) {
	n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
	if err != nil {
		return 0, false
	}
	return n, true
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

// stream writes one client's events.
type stream struct {
	h       *Handler
	w       http.ResponseWriter
	rc      *http.ResponseController
	sub     *registry.Subscriber
	lastSeq uint64 // highest sequence number written: later duplicates are skipped
	wake    <-chan struct{}
	frames  []*registry.Frame
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
func (st *stream) head() []byte {
	buf := append([]byte(nil), sse.Comment...)
	if st.h.Retry > 0 {
		buf = sse.AppendRetry(buf, time.Duration(st.h.Retry).Milliseconds())
	}
	return buf
}

// open sends the headers and the first comment at once, so that the client
// (and every proxy on the way) sees the stream is alive before any event.
func (st *stream) open() error {
	st.w.WriteHeader(http.StatusOK)
	// A stream outlives any server read or write timeout.
	_ = st.rc.SetReadDeadline(time.Time{})
	return st.write(st.head())
}

// write writes b and flushes, with a deadline so that a client that stopped
// reading cannot hold the goroutine forever.
func (st *stream) write(chunks ...[]byte) error {
	_ = st.rc.SetWriteDeadline(time.Now().Add(writeTimeout))
	for _, b := range chunks {
		if _, err := st.w.Write(b); err != nil {
			return err
		}
	}
	err := st.rc.Flush()
	_ = st.rc.SetWriteDeadline(time.Time{})
	return err
}

// replayFrames encodes what history kept after the client's last id,
// preceded by the missed-events notice when some of it was already trimmed.
// A close among them ends the stream after it.
func (st *stream) replayFrames(msgs []registry.Message, truncated bool, after uint64) [][]byte {
	var out [][]byte
	if truncated {
		out = append(out, registry.MissedFrame(after).Bytes)
	}
	for _, m := range msgs {
		f := st.h.hub.reg.Encode(st.h.format, m)
		if f.Seq > st.lastSeq {
			st.lastSeq = f.Seq
		}
		if len(f.Bytes) > 0 {
			out = append(out, f.Bytes)
		}
		if f.Close {
			st.sub.End(registry.ReasonClosed)
			break
		}
	}
	return out
}

// writeBatches writes frames, flushing every few dozen.
func (st *stream) writeBatches(frames [][]byte) error {
	const batch = 64
	for len(frames) > 0 {
		n := min(batch, len(frames))
		if err := st.write(frames[:n]...); err != nil {
			return err
		}
		metrics.delivered.Add(float64(n))
		frames = frames[n:]
	}
	return nil
}

// run is the stream's loop: it sleeps until frames are queued, a keepalive
// is due, or the stream must end, and returns why it ended.
func (st *stream) run(ctx context.Context) string {
	keepalive := time.NewTimer(time.Duration(st.h.Keepalive))
	defer keepalive.Stop()
	var maxDuration <-chan time.Time
	if d := time.Duration(st.h.MaxDuration); d > 0 {
		// Up to 10% jitter, so that streams opened together do not all
		// reconnect together.
		t := time.NewTimer(d - time.Duration(rand.Int64N(int64(d/10)+1)))
		defer t.Stop()
		maxDuration = t.C
	}
	for {
		select {
		case <-st.wake:
			why, err := st.drain()
			if err != nil {
				return "client"
			}
			if why != "" {
				return why
			}
			keepalive.Reset(time.Duration(st.h.Keepalive))
		case <-keepalive.C:
			if st.write(sse.Comment) != nil {
				return "client"
			}
			keepalive.Reset(time.Duration(st.h.Keepalive))
		case <-ctx.Done():
			return "client"
		case <-maxDuration:
			return "max_duration"
		case <-exiting:
			// Spread the reconnects, but stay prompt: Caddy waits for us.
			select {
			case <-time.After(time.Duration(rand.Int64N(int64(exitJitter)))):
			case <-ctx.Done():
			}
			return "shutdown"
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
	n := 0
	_ = st.rc.SetWriteDeadline(time.Now().Add(writeTimeout))
	for _, f := range frames {
		if f.Seq != 0 {
			if f.Seq <= st.lastSeq {
				continue // already sent by the replay
			}
			st.lastSeq = f.Seq
		}
		if len(f.Bytes) == 0 {
			continue
		}
		if _, err := st.w.Write(f.Bytes); err != nil {
			return why, err
		}
		n++
	}
	clear(frames) // let the frames go; the slice is reused
	err := st.rc.Flush()
	_ = st.rc.SetWriteDeadline(time.Time{})
	metrics.delivered.Add(float64(n))
	return why, err
}

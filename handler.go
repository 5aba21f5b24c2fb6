package caddysse

import (
	"context"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/caddy-sse/caddy-sse/registry"
	"github.com/caddy-sse/caddy-sse/sse"
	"github.com/caddy-sse/caddy-sse/stream"
)

const (
	// exitJitter spreads the reconnects of streams ended by a shutdown.
	exitJitter = 500 * time.Millisecond
	// replayTimeout bounds the read of one page of history.
	replayTimeout = 10 * time.Second
)

// ServeHTTP resolves the request's channels, admits it, attaches it to the
// registry, replays what the client missed and writes events until the
// client goes, the stream must end, or Caddy exits.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Method != http.MethodGet && r.Method != http.MethodPost {
		w.Header().Set("Allow", "GET, POST")
		return refuse(w, r, http.StatusMethodNotAllowed, "method", "method not allowed: use GET or POST")
	}
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	// Authentication comes before the channels resolve: the token's subject
	// may name them ({sse.jwt.sub}), and a client without a valid token
	// learns nothing about them.
	g, status, reason := h.authenticate(r, repl)
	if status != 0 {
		return h.refuseAuth(w, r, status, reason)
	}
	channels, status, reason := h.resolve(repl)
	if status != 0 {
		h.logger.Debug("stream refused", zap.Int("status", status), zap.String("reason", reason),
			zap.Strings("channels", channels))
		return refuse(w, r, status, "channels", reason)
	}
	if status, reason := h.authorize(g, channels); status != 0 {
		return h.refuseAuth(w, r, status, reason)
	}
	identity, ierr := h.identity(repl)
	if ierr != nil {
		return refuseIdentity(w, r, ierr)
	}
	if n := proc().streams.Add(1); h.MaxConnections > 0 && n > int64(h.MaxConnections) {
		proc().streams.Add(-1)
		w.Header().Set("Retry-After", strconv.Itoa(1+rand.IntN(5)))
		return refuse(w, r, http.StatusServiceUnavailable, "max_connections", "too many streams; retry later")
	}
	adm := &admission{}
	defer adm.releaseUnlessHandedOver()
	adm.add(func() { proc().streams.Add(-1) })

	if h.format == sse.FormatEnvelope {
		// A publisher ended these channels: serve the others, and tell
		// EventSource to stop reconnecting (204) when none is left.
		if channels = h.hub.openChannels(r.Context(), channels); len(channels) == 0 {
			proc().metrics.streamsRejected.WithLabelValues("closed").Inc()
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
	releasePer, ok := h.admitPer(repl, sub)
	if !ok {
		w.Header().Set("Retry-After", strconv.Itoa(1+rand.IntN(5)))
		return refuse(w, r, http.StatusTooManyRequests, "max_connections_per", "too many streams for this client")
	}
	adm.add(releasePer)
	var life *streamLife
	st := stream.New(sub, h.streams, h.streamEnd(g), func(res stream.Result) {
		adm.release()
		life.closed(string(res.Reason))
	})
	if err := h.hub.reg.Attach(r.Context(), sub); err != nil {
		return nil // the client went away, or the config is being unloaded
	}
	adm.add(func() { h.hub.reg.Detach(sub) })
	cur := h.hub.reg.Cursor(sub, from)
	st.SetCursor(cur)

	setHeaders(w.Header())
	proc().metrics.streamsOpen.Inc()
	adm.add(proc().metrics.streamsOpen.Dec)
	var unpresence func()
	life, unpresence = h.opened(channels, identity)
	if unpresence != nil {
		adm.add(unpresence)
	}
	h.logger.Debug("stream open", zap.Strings("channels", channels), zap.Bool("resume", resume))

	var conn net.Conn
	var budget int64
	headerSent := false
	if h.takeover && r.ProtoMajor == 1 {
		var ok bool
		if conn, budget, ok = takeOver(w, r); ok {
			st.SetSink(stream.NewConnSink(conn))
		}
		headerSent = true
	}
	if conn == nil {
		c, _ := r.Context().Value(connKey{}).(net.Conn)
		rs := stream.NewResponseSink(w, c)
		rs.Start(!headerSent)
		st.SetSink(rs)
	}
	// From here on the stream's end releases its admission.
	adm.handOver()
	if err := st.Write([][]byte{h.head()}, 0); err != nil {
		st.Abort()
		return nil
	}
	if resume {
		if err := h.replay(r.Context(), sub, cur, from, st.Write); err != nil {
			st.Abort()
			return nil
		}
	}
	if conn != nil {
		st.TakeOver(budget)
		return nil
	}
	st.Serve(r.Context())
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
func (h *Handler) streamEnd(g *grant) stream.Deadline {
	var end stream.Deadline
	now := time.Now()
	if d := time.Duration(h.MaxDuration); d > 0 {
		end = stream.Deadline{At: now.Add(d - time.Duration(rand.Int64N(int64(d/10)+1))), Reason: stream.ReasonMaxDuration}
	}
	if g != nil && !g.expires.IsZero() {
		left := g.expires.Sub(now)
		jitter := min(left/10, 5*time.Second)
		at := g.expires.Add(-time.Duration(rand.Int64N(int64(max(jitter, 0)) + 1)))
		if end.At.IsZero() || at.Before(end.At) {
			end = stream.Deadline{At: at, Reason: stream.ReasonExpired}
		}
	}
	return end
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

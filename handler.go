package caddysse

import (
	"context"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync/atomic"
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

// ServeHTTP admits a stream request, attaches its subscriber to the
// registry, replays what the client missed and serves the stream until the
// client goes, the stream must end, or Caddy exits.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	a, err := h.admit(w, r)
	if a == nil {
		return err // refused, or none of its channels is open (204)
	}
	st := h.attach(w, r, a)
	if st == nil {
		return nil // the client went away, or the config is being unloaded
	}
	// From here on the stream's end releases what the admission holds.
	if err := h.replay(r.Context(), a, st); err != nil {
		st.Abort()
		return nil
	}
	serve(r.Context(), a, st)
	return nil
}

// admission is an admitted stream request: what attaching, replaying and
// serving its stream need, and what the stream holds until it ends.
type admission struct {
	channels []string
	grant    *grant           // the token that admitted it; nil without jwt
	identity string           // its presence identity; "" when anonymous
	from     registry.EventID // the client's resume point
	resume   bool             // history is replayed from it
	sub      *registry.Subscriber
	held     *holdings

	// Set by attach.
	cursor    *registry.Cursor
	takenOver bool  // the stream writes on the client's connection
	budget    int64 // then, how many more bytes the client may send
}

// holdings is what an admitted stream holds until it ends, each set once
// acquired, in the order of the fields; release gives them back in reverse
// order. Whoever ends the stream releases them: the handler while it has
// not handed the stream over (reserve, attach), the stream's onEnd after,
// on whichever goroutine ends it. It is allocated apart from the
// admission, which holds the client's Last-Event-ID: a stream keeps only
// this until it ends.
type holdings struct {
	slot     bool                 // a place under max_connections (proc().streams)
	perKey   func()               // gives back its place under max_connections_per; nil: none
	reg      *registry.Registry   // the registry sub is attached to; nil: not attached
	sub      *registry.Subscriber // the stream's subscriber, once attached
	open     bool                 // counted in caddy_sse_streams_open
	presence func()               // uncounts its presence; nil: not counted

	released atomic.Bool
}

// release gives back what the stream holds, in reverse order of
// acquisition, once: a second call does nothing.
func (hd *holdings) release() {
	if hd.released.Swap(true) {
		return
	}
	if hd.presence != nil {
		hd.presence()
	}
	if hd.open {
		proc().metrics.streamsOpen.Dec()
	}
	if hd.reg != nil {
		hd.reg.Detach(hd.sub)
	}
	if hd.perKey != nil {
		hd.perKey()
	}
	if hd.slot {
		proc().streams.Add(-1)
	}
}

// admit decides whether r may open a stream: its method, authentication,
// channels, their authorization and the presence identity, then the
// connection limits (see reserve). It returns nil when it answered r
// itself, with what ServeHTTP returns.
func (h *Handler) admit(w http.ResponseWriter, r *http.Request) (*admission, error) {
	if r.Method != http.MethodGet && r.Method != http.MethodPost {
		w.Header().Set("Allow", "GET, POST")
		return nil, refuse(w, r, http.StatusMethodNotAllowed, "method", "method not allowed: use GET or POST")
	}
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	// Authentication comes before the channels resolve: the token's subject
	// may name them ({http.sse.jwt.sub}), and a client without a valid token
	// learns nothing about them.
	g, status, reason := h.authenticate(r, repl)
	if status != 0 {
		return nil, h.refuseAuth(w, r, status, reason)
	}
	channels, status, reason := h.resolve(repl)
	if status != 0 {
		h.logger.Debug("stream refused", zap.Int("status", status), zap.String("reason", reason),
			zap.Strings("channels", channels))
		return nil, refuse(w, r, status, "channels", reason)
	}
	if status, reason := h.authorize(g, channels); status != 0 {
		return nil, h.refuseAuth(w, r, status, reason)
	}
	identity, ierr := h.identity(repl)
	if ierr != nil {
		return nil, refuseIdentity(w, r, ierr)
	}
	return h.reserve(w, r, repl, &admission{channels: channels, grant: g, identity: identity})
}

// reserve counts a's stream under max_connections, drops the channels a
// publisher ended (envelope format), reads the resume point, and counts
// the stream under max_connections_per. It returns nil, with what it
// counted given back, when it answered r itself.
func (h *Handler) reserve(w http.ResponseWriter, r *http.Request, repl *caddy.Replacer, a *admission) (admitted *admission, err error) {
	if n := proc().streams.Add(1); h.MaxConnections > 0 && n > int64(h.MaxConnections) {
		proc().streams.Add(-1)
		w.Header().Set("Retry-After", retryAfter())
		return nil, refuse(w, r, http.StatusServiceUnavailable, "max_connections", "too many streams; retry later")
	}
	a.held = &holdings{slot: true}
	defer func() {
		if admitted == nil {
			a.held.release()
		}
	}()
	if h.format == sse.FormatEnvelope {
		// A publisher ended these channels: serve the others, and tell
		// EventSource to stop reconnecting (204) when none is left.
		if a.channels = h.hub.openChannels(r.Context(), a.channels); len(a.channels) == 0 {
			proc().metrics.streamsRejected.WithLabelValues("closed").Inc()
			w.WriteHeader(http.StatusNoContent)
			return nil, nil
		}
	}
	history := h.History.retention().MaxLen > 0
	a.from, a.resume = h.resumePoint(r, repl, history)
	a.sub = registry.NewSubscriber(a.channels, h.format, h.Buffer, history)
	if a.resume {
		a.sub.Replaying()
	}
	release, ok := h.admitPer(repl, a.sub)
	if !ok {
		w.Header().Set("Retry-After", retryAfter())
		return nil, refuse(w, r, http.StatusTooManyRequests, "max_connections_per", "too many streams for this client")
	}
	a.held.perKey = release
	return a, nil
}

// retryAfter is the Retry-After of a refusal for load: a few seconds,
// spread so that refused clients do not all come back together.
func retryAfter() string { return strconv.Itoa(1 + rand.IntN(5)) }

// resumePoint is where the client resumes when the handler keeps history:
// its Last-Event-ID (see lastEventID), or else the last_event_id template.
// resume reports whether history is replayed from it.
func (h *Handler) resumePoint(r *http.Request, repl *caddy.Replacer, history bool) (from registry.EventID, resume bool) {
	if history {
		from = registry.ParseEventID(lastEventID(r))
		if !from.Valid() && h.LastEventID != "" && repl != nil {
			from = registry.ParseEventID(repl.ReplaceAll(h.LastEventID, ""))
		}
	}
	return from, h.hub.reg.Resumes(from)
}

// attach makes a's stream and attaches its subscriber to the registry, then
// readies the stream: its cursor, the response headers, the open count,
// presence and lifecycle, and where it writes (see setSink). It returns
// nil, with a's holdings given back, when the subscriber could not attach;
// otherwise the stream's end gives them back.
func (h *Handler) attach(w http.ResponseWriter, r *http.Request, a *admission) (attached *stream.Stream) {
	held := a.held
	defer func() {
		if attached == nil {
			held.release()
		}
	}()
	var life *streamLife
	st := stream.New(a.sub, h.streams, h.streamEnd(a.grant), func(res stream.Result) {
		held.release()
		life.closed(string(res.Reason))
	})
	if err := h.hub.reg.Attach(r.Context(), a.sub); err != nil {
		return nil
	}
	held.reg, held.sub = h.hub.reg, a.sub
	a.cursor = h.hub.reg.Cursor(a.sub, a.from)
	st.SetCursor(a.cursor)

	setHeaders(w.Header())
	proc().metrics.streamsOpen.Inc()
	held.open = true
	life, held.presence = h.opened(a.channels, a.identity)
	h.logger.Debug("stream open", zap.Strings("channels", a.channels), zap.Bool("resume", a.resume))

	a.budget, a.takenOver = h.setSink(w, r, st)
	return st
}

// replay writes the stream's opening and, when the client resumes, the
// history it missed (see replayHistory); live frames queue meanwhile.
func (h *Handler) replay(ctx context.Context, a *admission, st *stream.Stream) error {
	if err := st.Write([][]byte{h.head()}, 0); err != nil {
		return err
	}
	if !a.resume {
		return nil
	}
	return h.replayHistory(ctx, a.sub, a.cursor, a.from, st.Write)
}

// serve hands the stream on: a taken-over one lives on without this
// goroutine, any other is written on it until it ends.
func serve(ctx context.Context, a *admission, st *stream.Stream) {
	if a.takenOver {
		st.TakeOver(a.budget)
		return
	}
	st.Serve(ctx)
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

// replayHistory writes the history of sub's channels after cur's positions (the
// client's Last-Event-ID, from), one page at a time: a page is written
// (write blocks on a slow client) before the next is read, and cur moves
// on with what is written. Live frames queue meanwhile; the resumable ones
// that find the queue full are read from history instead (see
// Subscriber.Replaying). A close found in history ends that channel of the
// stream.
func (h *Handler) replayHistory(ctx context.Context, sub *registry.Subscriber, cur *registry.Cursor, from registry.EventID, write func(bufs [][]byte, events int) error) error {
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

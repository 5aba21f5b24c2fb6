package caddysse

import (
	"context"
	"net"
	"net/http"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-sse/caddy-sse/registry"
	"github.com/caddy-sse/caddy-sse/stream"
)

// An HTTP/1.x stream is taken over once it is admitted: the client's
// connection becomes the stream's, and the request's goroutine, its buffers
// and Caddy's per-request state are released. An idle stream then costs a
// socket and a few hundred bytes (see package stream).

// afterRequestBudget is how many bytes a client may send after its request
// (beyond a body it declared) before its connection is closed: an SSE
// response never ends, so nothing it sends can be a request we will answer.
const afterRequestBudget = 64 << 10

// setSink has st write on the client's connection, taken over, when it can
// (HTTP/1.x, takeover on), and through w otherwise. ok reports a takeover,
// and budget how many more bytes the client may send then.
func (h *Handler) setSink(w http.ResponseWriter, r *http.Request, st *stream.Stream) (budget int64, ok bool) {
	headSent := false
	if h.takeover && r.ProtoMajor == 1 {
		conn, budget, ok := takeOver(w, r)
		if ok {
			st.SetSink(stream.NewConnSink(conn))
			return budget, true
		}
		headSent = true // by takeOver
	}
	c, _ := r.Context().Value(connKey{}).(net.Conn)
	rs := stream.NewResponseSink(w, c)
	rs.Start(!headSent)
	st.SetSink(rs)
	return 0, false
}

// takeOver has net/http write the response head and hijacks the connection.
// It returns the innermost connection (past Caddy's wrappers, which count
// bytes into the request's recorder that the access log reads, and hide
// writev), and how many more bytes the client may send. ok is false when
// the stream must go on through w instead (the head is written then).
func takeOver(w http.ResponseWriter, r *http.Request) (conn net.Conn, budget int64, ok bool) {
	// net/http writes the head, so that Caddy's access log and metrics
	// record the 200 like any response's; "identity" makes it a body that
	// runs until the connection closes, unchunked (net/http's own setup for
	// Server-Sent Events). An encoder that took the response (encode)
	// cannot be bypassed once its header is out: then stream through it.
	w.Header().Set("Transfer-Encoding", "identity")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	if err := rc.Flush(); err != nil || w.Header().Get("Content-Encoding") != "" {
		return nil, 0, false
	}
	hijacked, brw, err := rc.Hijack()
	if err != nil {
		return nil, 0, false
	}
	conn = hijacked
	if c, ok := r.Context().Value(connKey{}).(net.Conn); ok {
		conn = c
	}
	conn = stream.Innermost(conn)
	// Bytes the client sent after its request (a POST body, say) are not
	// ours to read; only how many there are matters.
	budget = int64(afterRequestBudget) + max(r.ContentLength, 0) - int64(brw.Reader.Buffered())
	_ = conn.SetReadDeadline(time.Time{})
	_ = conn.SetWriteDeadline(time.Time{})
	return conn, budget, true
}

// connKey holds, in a request's context, the client connection it came on:
// Caddy's servers hand it to the ConnContext hooks that modules register.
type connKey struct{}

// registerConnContext makes the connection of each request of srv visible
// to the streams: a taken-over stream writes on it, and a standard one whose
// writes stall closes it.
func registerConnContext(srv *caddyhttp.Server) {
	srv.RegisterConnContext(func(ctx context.Context, c net.Conn) context.Context {
		if ctx.Value(connKey{}) != nil {
			return ctx
		}
		return context.WithValue(ctx, connKey{}, c)
	})
}

// streamMetrics feeds the module's collectors from the streams.
type streamMetrics struct{}

func (streamMetrics) Delivered(n int) { proc().metrics.delivered.Add(float64(n)) }

func (streamMetrics) Ended(why registry.Reason) {
	proc().metrics.streamsClosed.WithLabelValues(string(why)).Inc()
}

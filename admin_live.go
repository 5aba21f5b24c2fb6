package caddysse

import (
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/base64"
	"math"
	"net/http"
	"regexp"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// The live view: GET /sse/live is a page that draws what GET
// /sse/live.json answers, polling it every second. The page is one file
// with its script and style inline, allowed by hash in a strict
// Content-Security-Policy; it loads nothing else.

//go:embed admin_live.html
var livePage []byte

const (
	// liveInterval is how often the counters are sampled.
	liveInterval = time.Second
	// liveSamples is how many samples are kept: ten minutes.
	liveSamples = 600
)

// liveCSP lets the page run its own inline script and style (by hash), read
// its own origin and show its data: icon, and nothing else: no other
// script, style, image, frame or form target.
var liveCSP = func() string {
	hash := func(re string) string {
		m := regexp.MustCompile(re).FindSubmatch(livePage)
		if m == nil {
			panic("admin_live.html: no " + re)
		}
		sum := sha256.Sum256(m[1])
		return "'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"
	}
	return "default-src 'none'; script-src " + hash(`(?s)<script>(.*?)</script>`) +
		"; style-src " + hash(`(?s)<style>(.*?)</style>`) +
		"; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
}()

func handleLivePage(w http.ResponseWriter, r *http.Request) error {
	if err := onlyGet(w, r); err != nil {
		return err
	}
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Content-Security-Policy", liveCSP)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Frame-Options", "DENY")
	// The page's own requests must carry a Referer: Caddy's admin endpoint
	// checks the origin of every request a browser makes.
	h.Set("Referrer-Policy", "same-origin")
	h.Set("Cross-Origin-Resource-Policy", "same-origin")
	h.Set("Cache-Control", "no-store")
	if r.Method == http.MethodHead {
		return nil
	}
	_, err := w.Write(livePage)
	return err
}

// liveAnswer is the answer of GET /sse/live.json.
type liveAnswer struct {
	// Now is when the answer was made, in milliseconds since the epoch.
	Now int64 `json:"now"`
	// IntervalMS is the time between two samples of Series.
	IntervalMS int64 `json:"interval_ms"`
	// Streams open on this instance, channels subscribed, Redis configs.
	Streams  int64 `json:"streams"`
	Channels int   `json:"channels"`
	Hubs     int   `json:"hubs"`
	// Totals since Caddy started: received (from Redis), delivered (to
	// clients), dropped, streams_closed, streams_rejected,
	// redis_reconnects, message_faults, frames_rejected, published.
	Totals map[string]float64 `json:"totals"`
	// The same by reason.
	Dropped  map[string]float64 `json:"events_dropped"`
	Closed   map[string]float64 `json:"streams_closed"`
	Rejected map[string]float64 `json:"streams_rejected"`
	// Redis is each Redis configuration: where, and whether its
	// subscription connection is up.
	Redis []liveHub `json:"redis"`
	// Series are the samples taken after the `since` query parameter
	// (milliseconds since the epoch), oldest first: at most ten minutes.
	Series []liveSample `json:"series"`
}

// liveHub is one Redis configuration in the live view.
type liveHub struct {
	Redis     redisDescription `json:"redis"`
	Connected bool             `json:"connected"`
	Channels  int              `json:"channels"`
}

// liveSample is one sample: the rates are per second over the interval
// that ends at T.
type liveSample struct {
	T         int64   `json:"t"`
	Streams   int64   `json:"streams"`
	Received  float64 `json:"received"`
	Delivered float64 `json:"delivered"`
	Dropped   float64 `json:"dropped"`
	Closed    float64 `json:"closed"`
	Rejected  float64 `json:"rejected"`
}

func handleLiveJSON(w http.ResponseWriter, r *http.Request) error {
	if err := onlyGet(w, r); err != nil {
		return err
	}
	var since int64
	if v := r.URL.Query().Get("since"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: adminError("since: milliseconds since the epoch")}
		}
		since = n
	}
	g := gatherLive()
	out := liveAnswer{
		Now:        time.Now().UnixMilli(),
		IntervalMS: liveInterval.Milliseconds(),
		Streams:    proc().streams.Load(),
		Totals: map[string]float64{
			"received":         g.sum("caddy_sse_redis_messages_received_total"),
			"delivered":        g.sum("caddy_sse_events_delivered_total"),
			"dropped":          g.sum("caddy_sse_events_dropped_total"),
			"streams_closed":   g.sum("caddy_sse_streams_closed_total"),
			"streams_rejected": g.sum("caddy_sse_streams_rejected_total"),
			"redis_reconnects": g.sum("caddy_sse_redis_reconnects_total"),
			"message_faults":   g.sum("caddy_sse_message_faults_total"),
			"frames_rejected":  g.sum("caddy_sse_messages_rejected_total"),
			"published":        g.sum("caddy_sse_published_total"),
		},
		Dropped:  g.byLabel("caddy_sse_events_dropped_total"),
		Closed:   g.byLabel("caddy_sse_streams_closed_total"),
		Rejected: g.byLabel("caddy_sse_streams_rejected_total"),
		Redis:    []liveHub{},
		Series:   proc().live.series(since),
	}
	proc().hubs.Range(func(key, value any) bool {
		h, ok := value.(*hub)
		if !ok {
			return true
		}
		n := h.reg.Snapshot().Channels
		out.Redis = append(out.Redis, liveHub{Redis: describeHubKey(key), Connected: h.brk.Connected(), Channels: n})
		out.Channels += n
		return true
	})
	sort.Slice(out.Redis, func(i, j int) bool { return out.Redis[i].Redis.sortKey() < out.Redis[j].Redis.sortKey() })
	out.Hubs = len(out.Redis)
	return writeAdminJSON(w, r, out)
}

// gathered are the module's metrics: name -> label value (the one label of
// a vector, "" for a plain metric) -> value.
type gathered map[string]map[string]float64

func (g gathered) sum(name string) float64 {
	var s float64
	for _, v := range g[name] {
		s += v
	}
	return s
}

func (g gathered) byLabel(name string) map[string]float64 {
	out := map[string]float64{}
	for k, v := range g[name] {
		out[k] = v
	}
	return out
}

func gatherLive() gathered {
	g := gathered{}
	mfs, _ := proc().liveRegistry().Gather()
	for _, mf := range mfs {
		vals := map[string]float64{}
		for _, m := range mf.GetMetric() {
			label := ""
			if lp := m.GetLabel(); len(lp) > 0 {
				label = lp[0].GetValue()
			}
			switch {
			case m.GetCounter() != nil:
				vals[label] += m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				vals[label] += m.GetGauge().GetValue()
			}
		}
		g[mf.GetName()] = vals
	}
	return g
}

// liveCounters are what one sample reads.
type liveCounters struct {
	streams                                        int64
	received, delivered, dropped, closed, rejected float64
}

func readLiveCounters() liveCounters {
	g := gatherLive()
	return liveCounters{
		streams:   proc().streams.Load(),
		received:  g.sum("caddy_sse_redis_messages_received_total"),
		delivered: g.sum("caddy_sse_events_delivered_total"),
		dropped:   g.sum("caddy_sse_events_dropped_total"),
		closed:    g.sum("caddy_sse_streams_closed_total"),
		rejected:  g.sum("caddy_sse_streams_rejected_total"),
	}
}

// Provision starts the sampling behind the live view for as long as this
// admin endpoint is up: Caddy cancels ctx when the config that made the
// endpoint goes.
func (*adminAPI) Provision(ctx caddy.Context) error {
	live := proc().live
	live.acquire()
	context.AfterFunc(ctx, live.release)
	return nil
}

// liveRecorder samples the counters while an admin endpoint is up. It is one
// per process (see process), as the counters are, so the history survives
// config reloads (each of which makes a new admin endpoint before the old one
// goes). It keeps the last liveSamples samples in a ring. One goroutine
// takes them, from the first acquire to the last release.
type liveRecorder struct {
	mu    sync.Mutex
	users int
	stop  context.CancelFunc
	done  chan struct{}

	ring  [liveSamples]liveSample
	n     int // samples in ring
	next  int // where the next one goes
	prev  liveCounters
	prevT time.Time
}

// acquire starts the sampling unless it runs already.
func (l *liveRecorder) acquire() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.users++
	if l.users > 1 {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	l.stop, l.done = cancel, make(chan struct{})
	l.prev, l.prevT = readLiveCounters(), time.Now()
	go l.run(ctx, l.done)
}

// release stops the sampling when nobody else needs it, and waits for it.
func (l *liveRecorder) release() {
	l.mu.Lock()
	l.users--
	if l.users > 0 {
		l.mu.Unlock()
		return
	}
	stop, done := l.stop, l.done
	l.stop, l.done = nil, nil
	l.mu.Unlock()
	if stop != nil {
		stop()
		<-done
	}
}

func (l *liveRecorder) run(ctx context.Context, done chan struct{}) {
	defer close(done)
	t := time.NewTicker(liveInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			l.record(now, readLiveCounters())
		}
	}
}

// record adds the sample c taken at now, as rates since the previous one.
func (l *liveRecorder) record(now time.Time, c liveCounters) {
	l.mu.Lock()
	defer l.mu.Unlock()
	dt := now.Sub(l.prevT).Seconds()
	if dt <= 0 {
		return
	}
	rate := func(cur, prev float64) float64 { return math.Round(max(cur-prev, 0)/dt*1000) / 1000 }
	l.ring[l.next] = liveSample{
		T:         now.UnixMilli(),
		Streams:   c.streams,
		Received:  rate(c.received, l.prev.received),
		Delivered: rate(c.delivered, l.prev.delivered),
		Dropped:   rate(c.dropped, l.prev.dropped),
		Closed:    rate(c.closed, l.prev.closed),
		Rejected:  rate(c.rejected, l.prev.rejected),
	}
	l.next = (l.next + 1) % liveSamples
	l.n = min(l.n+1, liveSamples)
	l.prev, l.prevT = c, now
}

// series returns the samples taken after since (ms), oldest first.
func (l *liveRecorder) series(since int64) []liveSample {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := []liveSample{}
	for i := 0; i < l.n; i++ {
		s := l.ring[(l.next-l.n+i+liveSamples)%liveSamples]
		if s.T > since {
			out = append(out, s)
		}
	}
	return out
}

// Interface guards
var _ caddy.Provisioner = (*adminAPI)(nil)

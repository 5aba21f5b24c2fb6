// Command sse-load measures an SSE push server: it opens many event streams,
// publishes through Redis (PUBLISH) or an HTTP publisher at a set rate, and
// reports delivery, latency from publish to receipt, and the CPU time and
// resident memory of the server's processes read from /proc.
//
// Workloads (-mode):
//
//	fanout   N streams on one channel; E events at R/s to that channel
//	unicast  N streams on N channels; E events at R/s spread over them
//	idle     N streams (one channel each, or -channels); RSS per stream
//	         after -settle
//	connect  open a stream, read its head, close it, as fast as -workers
//	         goroutines can for -duration; connects per second
//
// Streams are opened on http:// URLs with the tool's own HTTP/1.1 client
// (a raw connection per stream). On https:// URLs, -proto h2 (the default
// there) opens each stream on a TLS connection of its own that negotiates
// HTTP/2 (net/http's Transport.NewClientConn: one stream per connection,
// never pooled), and -proto h1 runs the tool's HTTP/1.1 client inside TLS;
// -insecure or -cacert say how the server's certificate is checked.
//
// Every phase is bounded in time, and -timeout bounds the whole run. The
// tool raises its RLIMIT_NOFILE soft limit to the hard limit at start and
// reports both. Connections are spread over the source addresses of -src
// (loopback only) so that many streams do not exhaust one address's
// ephemeral ports.
//
// Example, against caddy-sse with Redis on 6379:
//
//	sse-load -mode fanout -streams 5000 -events 40 -rate 20 \
//	    -sub 'http://127.0.0.1:8080/sub/{ch}' -pub redis://127.0.0.1:6379 \
//	    -server-pids "$(pgrep -d, caddy)" -redis-pids "$(pgrep -d, redis-server)"
//
// With -summarize, it instead reads the JSON lines of earlier runs and
// writes a Markdown table of medians and the data of a chart.
package main

import (
	"cmp"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type config struct {
	mode        string
	name        string
	label       string
	run         int
	sub         string
	pub         string
	streams     int
	channels    int
	events      int
	rate        float64
	payload     int
	pubWorkers  int
	dialConc    int
	workers     int
	duration    time.Duration
	maxConnects int
	settle      time.Duration
	drain       time.Duration
	openTimeout time.Duration
	headTimeout time.Duration
	timeout     time.Duration
	prefix      string
	src         string
	bufSize     int
	proto       string
	cafile      string
	insecure    bool
	serverPids  []int
	redisPids   []int
	readyFile   string
	readyPause  time.Duration
	hold        time.Duration
	json        bool
}

func main() {
	var cfg config
	var serverPids, redisPids, summarize, mdOut, datOut, baseline string
	flag.StringVar(&cfg.mode, "mode", "fanout", "workload: fanout, unicast, idle or connect")
	flag.StringVar(&cfg.name, "name", "", "name of the scenario in the report (default: the mode)")
	flag.StringVar(&cfg.label, "label", "", "name of the server in the report")
	flag.IntVar(&cfg.run, "run", 0, "number of the run (alternation) in the report")
	flag.StringVar(&cfg.sub, "sub", "http://127.0.0.1:8080/sub/{ch}", "stream URL template (http:// or https://); {ch} is the channel")
	flag.StringVar(&cfg.proto, "proto", "", "h1 (HTTP/1.1, the tool's own client, over TCP or TLS) or h2 (HTTP/2 over TLS, one connection per stream); default h1 for http://, h2 for https://")
	flag.StringVar(&cfg.cafile, "cacert", "", "https://: PEM file of the CA the server's certificate is checked against (default: the system's)")
	flag.BoolVar(&cfg.insecure, "insecure", false, "https://: do not check the server's certificate")
	flag.StringVar(&cfg.pub, "pub", "redis://127.0.0.1:6379", "publish with PUBLISH to this redis:// URL, or POST to this http:// URL template with {ch}")
	flag.IntVar(&cfg.streams, "streams", 1000, "streams to open")
	flag.IntVar(&cfg.channels, "channels", 0, "idle: channels the streams are spread over (0: one per stream)")
	flag.IntVar(&cfg.events, "events", 40, "events to publish")
	flag.Float64Var(&cfg.rate, "rate", 20, "events per second (0: as fast as possible)")
	flag.IntVar(&cfg.payload, "payload", 64, "payload size in bytes (at least the send time)")
	flag.IntVar(&cfg.pubWorkers, "pub-workers", 8, "concurrent publishers")
	flag.IntVar(&cfg.dialConc, "dial-concurrency", 128, "streams being opened at once")
	flag.IntVar(&cfg.workers, "workers", 32, "connect: concurrent connecting goroutines")
	flag.DurationVar(&cfg.duration, "duration", 10*time.Second, "connect: how long to connect")
	flag.IntVar(&cfg.maxConnects, "max-connects", 1000000, "connect: stop after this many connects")
	flag.DurationVar(&cfg.settle, "settle", 2*time.Second, "wait after the streams are open, before measuring RSS and publishing")
	flag.DurationVar(&cfg.drain, "drain", 10*time.Second, "wait at most this long after the last publish for deliveries")
	flag.DurationVar(&cfg.openTimeout, "open-timeout", 90*time.Second, "give up opening streams after this long")
	flag.DurationVar(&cfg.headTimeout, "head-timeout", 10*time.Second, "one stream's connect and response head")
	flag.DurationVar(&cfg.timeout, "timeout", 5*time.Minute, "the whole run; past it the tool exits with status 3")
	flag.StringVar(&cfg.prefix, "prefix", "", "channel name prefix (default: unique per run, so no history of an earlier run is replayed)")
	flag.StringVar(&cfg.src, "src", "127.0.0.2-127.0.0.254", "source addresses, round robin: a range in the last octet, a list, or none")
	flag.IntVar(&cfg.bufSize, "bufsize", 512, "read buffer per stream, bytes")
	flag.StringVar(&serverPids, "server-pids", "", "pids of the server's processes, comma-separated (CPU and RSS)")
	flag.StringVar(&redisPids, "redis-pids", "", "pids of redis-server, comma-separated (CPU and RSS)")
	flag.StringVar(&cfg.readyFile, "ready-file", "", "create this file when the measured phase starts (for profilers)")
	flag.DurationVar(&cfg.readyPause, "ready-pause", 0, "wait this long after creating -ready-file before publishing (profilers see the streams idle)")
	flag.DurationVar(&cfg.hold, "hold", 0, "keep the streams open this long after measuring (for profilers)")
	flag.BoolVar(&cfg.json, "json", false, "print one JSON line on stdout (the table goes to stderr)")
	flag.StringVar(&summarize, "summarize", "", "summarize the JSON lines of this file instead of running")
	flag.StringVar(&mdOut, "md", "", "summarize: write the Markdown table here (default: stdout)")
	flag.StringVar(&datOut, "dat", "", "summarize: write the chart data here")
	flag.StringVar(&baseline, "baseline", "nchan", "summarize: the labels ratios are taken against, comma-separated (e.g. nchan,floor,go-floor)")
	flag.Parse()

	if summarize != "" {
		if err := runSummary(summarize, mdOut, datOut, baseline); err != nil {
			fatal(err)
		}
		return
	}
	var err error
	if cfg.serverPids, err = parsePids(serverPids); err != nil {
		fatal(fmt.Errorf("-server-pids: %w", err))
	}
	if cfg.redisPids, err = parsePids(redisPids); err != nil {
		fatal(fmt.Errorf("-redis-pids: %w", err))
	}
	if cfg.name == "" {
		cfg.name = cfg.mode
	}
	if cfg.prefix == "" {
		cfg.prefix = "load" + strconv.FormatInt(time.Now().UnixNano()%1e12, 36) + "-"
	}
	if cfg.streams < 0 || cfg.events < 0 || cfg.rate < 0 || cfg.pubWorkers < 1 || cfg.dialConc < 1 || cfg.workers < 1 {
		fatal(fmt.Errorf("counts and rates must not be negative; workers at least 1"))
	}

	// The tool stops by itself, whatever happens.
	time.AfterFunc(cfg.timeout, func() {
		fmt.Fprintf(os.Stderr, "sse-load: -timeout %s reached, exiting\n", cfg.timeout)
		os.Exit(3)
	})

	rep, err := run(cfg)
	if err != nil {
		fatal(err)
	}
	table := os.Stdout
	if cfg.json {
		table = os.Stderr
		b, _ := json.Marshal(rep)
		fmt.Println(string(b))
	}
	rep.print(table)
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "sse-load:", err)
	os.Exit(1)
}

// report is the outcome of one run; it is also the JSON line.
type report struct {
	Name  string `json:"name"`
	Label string `json:"label,omitempty"`
	Mode  string `json:"mode"`
	Run   int    `json:"run,omitempty"`
	Time  string `json:"time"`

	Nofile uint64 `json:"nofile"`
	// Proto is how the streams were opened: h1 (plain HTTP/1.1), h1+tls
	// or h2 (HTTP/2 over TLS, one connection per stream).
	Proto string `json:"proto,omitempty"`

	Streams     int     `json:"streams"`
	Channels    int     `json:"channels"`
	Connected   int64   `json:"connected"`
	OpenFailed  int64   `json:"open_failed"`
	Lost        int64   `json:"lost"`
	OpenSeconds float64 `json:"open_s"`

	Events         int     `json:"events"`
	Rate           float64 `json:"rate"`
	Published      int64   `json:"published"`
	PublishErrors  int64   `json:"publish_errors"`
	PublishSeconds float64 `json:"publish_s"`
	Expected       int64   `json:"expected"`
	Delivered      int64   `json:"delivered"`
	Unstamped      int64   `json:"unstamped"`

	LatP50  float64 `json:"lat_p50_ms"`
	LatP90  float64 `json:"lat_p90_ms"`
	LatP99  float64 `json:"lat_p99_ms"`
	LatMax  float64 `json:"lat_max_ms"`
	LatMean float64 `json:"lat_mean_ms"`

	// CPU seconds of the measured phase (publish and drain, the idle
	// settle, or the connect loop): total is server + redis.
	CPUTotal  float64 `json:"cpu_total_s"`
	CPUServer float64 `json:"cpu_server_s"`
	CPURedis  float64 `json:"cpu_redis_s"`
	// ... per delivered event (fanout, unicast) or per connect (connect).
	CPUTotalUs  float64 `json:"cpu_total_us_per_event,omitempty"`
	CPUServerUs float64 `json:"cpu_server_us_per_event,omitempty"`
	CPURedisUs  float64 `json:"cpu_redis_us_per_event,omitempty"`
	// CPU seconds spent opening the streams.
	OpenCPUTotal  float64 `json:"open_cpu_total_s"`
	OpenCPUServer float64 `json:"open_cpu_server_s"`
	OpenCPURedis  float64 `json:"open_cpu_redis_s"`

	RSSBefore       int64   `json:"rss_before_kib"`
	RSSAfter        int64   `json:"rss_after_kib"`
	RSSServerBefore int64   `json:"rss_server_before_kib"`
	RSSServerAfter  int64   `json:"rss_server_after_kib"`
	RSSRedisBefore  int64   `json:"rss_redis_before_kib"`
	RSSRedisAfter   int64   `json:"rss_redis_after_kib"`
	RSSPerStream    float64 `json:"rss_per_stream_kib"`
	RSSServerPer    float64 `json:"rss_server_per_stream_kib"`
	RSSRedisPer     float64 `json:"rss_redis_per_stream_kib"`

	Connects      int64   `json:"connects,omitempty"`
	ConnectErrors int64   `json:"connect_errors,omitempty"`
	ConnectsPerS  float64 `json:"connects_per_s,omitempty"`

	ClientCPU float64  `json:"client_cpu_s"`
	Errors    []string `json:"errors,omitempty"`
}

// sample is the state of the server's and Redis's processes at one time.
type sample struct{ server, redis procSample }

func (cfg config) sample() sample {
	return sample{server: sampleProcs(cfg.serverPids), redis: sampleProcs(cfg.redisPids)}
}

func (s sample) cpu() float64 { return s.server.cpu + s.redis.cpu }
func (s sample) rss() int64   { return s.server.rss + s.redis.rss }

func run(cfg config) (*report, error) {
	rep := &report{Name: cfg.name, Label: cfg.label, Mode: cfg.mode, Run: cfg.run,
		Time: time.Now().UTC().Format(time.RFC3339), Streams: cfg.streams, Events: cfg.events, Rate: cfg.rate}
	soft, hard, err := raiseNofile()
	if err != nil {
		rep.addErr(fmt.Errorf("raising RLIMIT_NOFILE: %w", err))
	} else {
		fmt.Fprintf(os.Stderr, "sse-load: RLIMIT_NOFILE raised to the hard limit: %d (hard %d)\n", soft, hard)
	}
	rep.Nofile = soft
	tgt, err := parseTarget(cfg.sub)
	if err != nil {
		return nil, fmt.Errorf("-sub: %w", err)
	}
	ips, err := parseSources(cfg.src)
	if err != nil {
		return nil, fmt.Errorf("-src: %w", err)
	}
	bufSize := max(cfg.bufSize, 64)
	proto, err := checkProto(cfg.proto, tgt)
	if err != nil {
		return nil, err
	}
	c := &client{tgt: tgt, dialers: newDialers(ips, cfg.headTimeout), base: time.Now(), bufSize: bufSize, proto: proto}
	rep.Proto = proto
	if tgt.scheme == "https" {
		if c.tlsConf, err = tlsConfig(cfg.cafile, cfg.insecure); err != nil {
			return nil, fmt.Errorf("-cacert: %w", err)
		}
		if proto == protoH1 {
			rep.Proto = "h1+tls"
		} else {
			c.h2 = h2Transport(c.dialers, c.tlsConf, cfg.headTimeout)
		}
	}
	ctx := context.Background()
	selfCPU0, _ := procCPU(os.Getpid())
	defer func() {
		if selfCPU, err := procCPU(os.Getpid()); err == nil {
			rep.ClientCPU = selfCPU - selfCPU0
		}
	}()

	switch cfg.mode {
	case "fanout", "unicast", "idle":
	case "connect":
		return rep, runConnect(ctx, cfg, c, rep)
	default:
		return nil, fmt.Errorf("-mode %q: want fanout, unicast, idle or connect", cfg.mode)
	}

	nch := 1
	switch cfg.mode {
	case "unicast":
		nch = cfg.streams
	case "idle":
		nch = cfg.channels
		if nch <= 0 {
			nch = cfg.streams
		}
	}
	rep.Channels = nch
	channel := func(i int) string { return cfg.prefix + strconv.Itoa(i%max(nch, 1)) }

	var pub publisher
	if cfg.mode != "idle" && cfg.events > 0 {
		if pub, err = newPublisher(cfg.pub, cfg.pubWorkers); err != nil {
			return nil, err
		}
		defer pub.close()
	}

	before := cfg.sample()
	rep.RSSBefore, rep.RSSServerBefore, rep.RSSRedisBefore = before.rss(), before.server.rss, before.redis.rss

	// Open the streams.
	live := make([]atomic.Bool, nch) // channels with a stream
	openStart := time.Now()
	var opened sync.WaitGroup
	sem := make(chan struct{}, cfg.dialConc)
	openCtx, openCancel := context.WithTimeout(ctx, cfg.openTimeout)
	for i := 0; i < cfg.streams; i++ {
		select {
		case sem <- struct{}{}:
		case <-openCtx.Done():
		}
		if openCtx.Err() != nil {
			break
		}
		opened.Add(1)
		go c.stream(openCtx, channel(i), cfg.headTimeout, func(ok bool) {
			if ok {
				live[i%nch].Store(true)
			}
			<-sem
			opened.Done()
		})
	}
	waitTimeout(&opened, time.Until(openStart.Add(cfg.openTimeout+cfg.headTimeout)))
	openCancel()
	rep.OpenSeconds = time.Since(openStart).Seconds()
	rep.Connected = c.connected.Load()
	rep.OpenFailed = int64(cfg.streams) - rep.Connected
	if err := c.firstErrOf(); err != nil && rep.OpenFailed > 0 {
		rep.addErr(fmt.Errorf("opening streams: %d failed, first: %w", rep.OpenFailed, err))
	}
	fmt.Fprintf(os.Stderr, "sse-load: %d/%d streams open in %.1fs\n", rep.Connected, cfg.streams, rep.OpenSeconds)
	opens := cfg.sample()
	rep.OpenCPUTotal = opens.cpu() - before.cpu()
	rep.OpenCPUServer = opens.server.cpu - before.server.cpu
	rep.OpenCPURedis = opens.redis.cpu - before.redis.cpu

	time.Sleep(cfg.settle)
	after := cfg.sample()
	rep.RSSAfter, rep.RSSServerAfter, rep.RSSRedisAfter = after.rss(), after.server.rss, after.redis.rss
	if rep.Connected > 0 {
		n := float64(rep.Connected)
		rep.RSSPerStream = float64(rep.RSSAfter-rep.RSSBefore) / n
		rep.RSSServerPer = float64(rep.RSSServerAfter-rep.RSSServerBefore) / n
		rep.RSSRedisPer = float64(rep.RSSRedisAfter-rep.RSSRedisBefore) / n
	}
	cfg.ready()
	if cfg.readyFile != "" {
		time.Sleep(cfg.readyPause)
	}

	start, end := opens, after // idle: CPU of the settle time
	if pub != nil {
		for i := 0; i < cfg.events; i++ {
			switch {
			case cfg.mode == "fanout":
				rep.Expected += rep.Connected
			case live[i%nch].Load():
				rep.Expected++
			}
		}
		start = cfg.sample()
		res := publishPaced(ctx, c, pub, cfg.events, cfg.rate, cfg.pubWorkers, cfg.payload, channel)
		rep.Published, rep.PublishErrors, rep.PublishSeconds = res.published, res.errors, res.elapsed.Seconds()
		if res.firstErr != nil {
			rep.addErr(fmt.Errorf("publishing: %d failed, first: %w", res.errors, res.firstErr))
		}
		deadline := time.Now().Add(cfg.drain)
		for c.delivered.Load()+c.unstamped.Load() < rep.Expected && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		end = cfg.sample()
	}
	rep.CPUTotal = end.cpu() - start.cpu()
	rep.CPUServer = end.server.cpu - start.server.cpu
	rep.CPURedis = end.redis.cpu - start.redis.cpu
	rep.Delivered, rep.Unstamped = c.delivered.Load(), c.unstamped.Load()
	if rep.Delivered > 0 {
		n := float64(rep.Delivered) / 1e6
		rep.CPUTotalUs, rep.CPUServerUs, rep.CPURedisUs = rep.CPUTotal/n, rep.CPUServer/n, rep.CPURedis/n
	}
	rep.latencies(&c.latency)
	for _, s := range []procSample{before.server, before.redis, end.server, end.redis} {
		if s.err != nil {
			rep.addErr(fmt.Errorf("reading /proc: %w", s.err))
			break
		}
	}
	time.Sleep(cfg.hold)
	rep.Lost = c.lost.Load()
	c.closeAll(10 * time.Second)
	return rep, nil
}

// runConnect opens and closes streams for cfg.duration.
func runConnect(ctx context.Context, cfg config, c *client, rep *report) error {
	var n, fails atomic.Int64
	var errOnce sync.Once
	var firstErr error
	s0 := cfg.sample()
	rep.RSSBefore, rep.RSSServerBefore, rep.RSSRedisBefore = s0.rss(), s0.server.rss, s0.redis.rss
	cfg.ready()
	start := time.Now()
	// The connects in flight at the end are let finish (each bounded by
	// -head-timeout) and counted: a deadline shared with them would fail
	// them all at once, and a loop could spin on such failures.
	end := start.Add(cfg.duration)
	var wg sync.WaitGroup
	var seq atomic.Int64
	for range cfg.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(end) {
				i := seq.Add(1)
				if i > int64(cfg.maxConnects) {
					return
				}
				t0 := c.now()
				err := c.connectOnce(ctx, cfg.prefix+"k"+strconv.FormatInt(i, 10), cfg.headTimeout)
				if err != nil {
					fails.Add(1)
					took := time.Duration(c.now() - t0).Round(time.Millisecond)
					errOnce.Do(func() { firstErr = fmt.Errorf("after %v: %w", took, err) })
					continue
				}
				n.Add(1)
				c.latency.Record(uint64((c.now() - t0) / int64(time.Microsecond)))
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	s1 := cfg.sample()
	rep.RSSAfter, rep.RSSServerAfter, rep.RSSRedisAfter = s1.rss(), s1.server.rss, s1.redis.rss
	rep.Connects, rep.ConnectErrors = n.Load(), fails.Load()
	rep.ConnectsPerS = float64(rep.Connects) / elapsed.Seconds()
	rep.PublishSeconds = elapsed.Seconds()
	rep.CPUTotal = s1.cpu() - s0.cpu()
	rep.CPUServer = s1.server.cpu - s0.server.cpu
	rep.CPURedis = s1.redis.cpu - s0.redis.cpu
	if rep.Connects > 0 {
		k := float64(rep.Connects) / 1e6
		rep.CPUTotalUs, rep.CPUServerUs, rep.CPURedisUs = rep.CPUTotal/k, rep.CPUServer/k, rep.CPURedis/k
	}
	rep.latencies(&c.latency)
	if firstErr != nil {
		rep.addErr(fmt.Errorf("connecting: %d failed, first: %w", rep.ConnectErrors, firstErr))
	}
	if s0.server.err != nil || s1.server.err != nil {
		rep.addErr(fmt.Errorf("reading /proc of the server"))
	}
	return nil
}

func (cfg config) ready() {
	if cfg.readyFile != "" {
		_ = os.WriteFile(cfg.readyFile, []byte("ready\n"), 0o644)
	}
}

func (c *client) firstErrOf() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.firstErr
}

func waitTimeout(wg *sync.WaitGroup, d time.Duration) {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	t := time.NewTimer(max(d, 0))
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
	}
}

func (r *report) addErr(err error) { r.Errors = append(r.Errors, err.Error()) }

func (r *report) latencies(h *histogram) {
	ms := func(us uint64) float64 { return float64(us) / 1000 }
	r.LatP50, r.LatP90, r.LatP99 = ms(h.Percentile(50)), ms(h.Percentile(90)), ms(h.Percentile(99))
	r.LatMax, r.LatMean = ms(h.Max()), h.Mean()/1000
}

// print writes the human table.
func (r *report) print(w io.Writer) {
	p := func(k, format string, a ...any) { fmt.Fprintf(w, "  %-22s "+format+"\n", append([]any{k}, a...)...) }
	fmt.Fprintf(w, "sse-load %s", r.Name)
	if r.Label != "" {
		fmt.Fprintf(w, "  [%s]", r.Label)
	}
	if r.Run > 0 {
		fmt.Fprintf(w, "  run %d", r.Run)
	}
	fmt.Fprintf(w, "  (%s, %s, RLIMIT_NOFILE %d)\n", r.Mode, cmp.Or(r.Proto, protoH1), r.Nofile)
	lat := fmt.Sprintf("p50 %.2f  p90 %.2f  p99 %.2f  max %.2f  mean %.2f ms", r.LatP50, r.LatP90, r.LatP99, r.LatMax, r.LatMean)
	cpu := fmt.Sprintf("%.2f s (server %.2f + redis %.2f)", r.CPUTotal, r.CPUServer, r.CPURedis)
	if r.Mode == "connect" {
		p("connects", "%d in %.1f s = %.0f/s (%d failed)", r.Connects, r.PublishSeconds, r.ConnectsPerS, r.ConnectErrors)
		p("connect latency", "%s", lat)
		p("server CPU", "%s", cpu)
		p("CPU per connect", "%.1f us (server %.1f + redis %.1f)", r.CPUTotalUs, r.CPUServerUs, r.CPURedisUs)
	} else {
		p("streams", "%d/%d connected in %.1f s, %d failed, %d lost; %d channel(s)", r.Connected, r.Streams, r.OpenSeconds, r.OpenFailed, r.Lost, r.Channels)
		p("open CPU", "%.2f s (server %.2f + redis %.2f)", r.OpenCPUTotal, r.OpenCPUServer, r.OpenCPURedis)
		if r.Mode != "idle" {
			p("published", "%d/%d in %.1f s at %.0f/s (%d errors)", r.Published, r.Events, r.PublishSeconds, r.Rate, r.PublishErrors)
			p("delivered", "%d/%d (%d without a send time)", r.Delivered, r.Expected, r.Unstamped)
			p("latency", "%s", lat)
			p("server CPU", "%s", cpu)
			p("CPU per event", "%.2f us (server %.2f + redis %.2f)", r.CPUTotalUs, r.CPUServerUs, r.CPURedisUs)
		} else {
			p("idle CPU (settle)", "%s", cpu)
		}
		p("RSS before / after", "%d / %d KiB (server %d / %d, redis %d / %d)", r.RSSBefore, r.RSSAfter,
			r.RSSServerBefore, r.RSSServerAfter, r.RSSRedisBefore, r.RSSRedisAfter)
		p("RSS per stream", "%.2f KiB (server %.2f + redis %.2f)", r.RSSPerStream, r.RSSServerPer, r.RSSRedisPer)
	}
	p("client CPU", "%.2f s", r.ClientCPU)
	if len(r.Errors) > 0 {
		p("errors", "%s", strings.Join(r.Errors, "; "))
	}
}

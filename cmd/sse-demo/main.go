// Command sse-demo shows caddy-sse working with nothing installed but Go:
//
//	go run ./cmd/sse-demo
//
// then open http://127.0.0.1:8090 in a browser, pick a room, and send
// messages; open the page in two windows to see them cross. (Not 8080: that
// is where the README's quick start puts the user's own app.)
//
// It is a demo, not for production. Unless -redis names a real Redis, it
// starts an embedded fake Redis (miniredis, in this process, on a free
// loopback port) that keeps nothing on disk and implements only part of
// Redis; only this command imports it. It then runs Caddy in this process
// with the Caddyfile in Caddyfile.tmpl: `sse` streams /events/<room> from the
// Redis channel room:<room>, `sse_publish` publishes a POST to
// /publish/<room> on that channel (open to anyone who can reach the port:
// a real deployment puts authentication in front of it), and file_server
// serves the demo page, which is compiled into the binary.
//
// Flags:
//
//	-listen host:port   where Caddy listens (default 127.0.0.1:8090)
//	-redis url          use this Redis (redis:// or rediss://) instead of the embedded one
//	-v                  Caddy's logs at INFO instead of WARN
//	-print-caddyfile    print the Caddyfile the demo would run, and exit
package main

import (
	"context"
	_ "embed"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"text/template"

	"github.com/alicebob/miniredis/v2"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile" // the "caddyfile" adapter

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-sse/caddy-sse"
)

// defaultListen is where the demo listens unless -listen says otherwise. Not
// 8080: the README's quick start has the user's own app there.
const defaultListen = "127.0.0.1:8090"

//go:embed Caddyfile.tmpl
var caddyfileTemplate string

var caddyfileTmpl = template.Must(template.New("Caddyfile").Parse(caddyfileTemplate))

// options configure one run of the demo.
type options struct {
	// Listen is the host:port Caddy listens on; an empty host means every
	// interface.
	Listen string
	// RedisURL is a real Redis to use; empty starts the embedded one.
	RedisURL string
	// Verbose logs Caddy at INFO instead of WARN.
	Verbose bool
	// Out receives the banner: the URL to open and how to publish.
	Out io.Writer
}

func main() {
	opts := options{Out: os.Stdout}
	flag.StringVar(&opts.Listen, "listen", defaultListen, "`host:port` for Caddy to listen on")
	flag.StringVar(&opts.RedisURL, "redis", "", "Redis `url` (redis:// or rediss://) to use instead of the embedded fake Redis")
	flag.BoolVar(&opts.Verbose, "v", false, "log Caddy at INFO instead of WARN")
	printCaddyfile := flag.Bool("print-caddyfile", false, "print the Caddyfile the demo would run, and exit")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "Usage: go run ./cmd/sse-demo [flags]\n\n"+
			"A caddy-sse demo with an embedded fake Redis; not for production.\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() > 0 {
		flag.Usage()
		os.Exit(2)
	}

	if *printCaddyfile {
		redisURL := opts.RedisURL
		if redisURL == "" {
			redisURL = "redis://127.0.0.1:<embedded-port>"
		}
		cf, err := caddyfileFor(opts.Listen, redisURL, opts.Verbose)
		if err != nil {
			fmt.Fprintln(os.Stderr, "sse-demo:", err)
			os.Exit(2)
		}
		fmt.Print(cf)
		return
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		// A second Ctrl-C kills the process the usual way.
		<-ctx.Done()
		stop()
	}()
	if err := run(ctx, opts); err != nil {
		fmt.Fprintln(os.Stderr, "sse-demo:", err)
		os.Exit(1)
	}
}

// run starts the demo and stops it when ctx ends.
func run(ctx context.Context, opts options) error {
	if opts.Out == nil {
		opts.Out = io.Discard
	}
	d, err := start(opts)
	if err != nil {
		return err
	}
	<-ctx.Done()
	fmt.Fprintln(opts.Out, "\nstopping")
	return d.stop()
}

// demo is a running demo: Caddy, and the embedded Redis if it started one.
type demo struct {
	redis *miniredis.Miniredis // nil with a real Redis
}

// start starts the embedded Redis (unless opts names a real one) and Caddy,
// prints the banner, and returns once Caddy listens.
func start(opts options) (*demo, error) {
	if opts.Out == nil {
		opts.Out = io.Discard
	}
	if err := checkFree(opts.Listen); err != nil {
		return nil, err
	}
	d := &demo{}
	redisURL := opts.RedisURL
	if redisURL == "" {
		// Loopback only: the fake Redis takes any command from anyone.
		m := miniredis.NewMiniRedis()
		if err := m.StartAddr("127.0.0.1:0"); err != nil {
			return nil, fmt.Errorf("starting the embedded Redis: %w", err)
		}
		d.redis = m
		redisURL = "redis://" + m.Addr()
	}

	cf, err := caddyfileFor(opts.Listen, redisURL, opts.Verbose)
	if err != nil {
		d.closeRedis()
		return nil, err
	}
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cf),
		map[string]any{"filename": "Caddyfile"})
	if err != nil {
		d.closeRedis()
		return nil, fmt.Errorf("adapting the Caddyfile: %w", err)
	}
	for _, w := range warnings {
		fmt.Fprintf(os.Stderr, "sse-demo: Caddyfile:%d: %s\n", w.Line, w.Message)
	}
	if err := caddy.Load(cfg, true); err != nil {
		d.closeRedis()
		return nil, fmt.Errorf("starting Caddy: %w", err)
	}

	d.banner(opts.Out, opts.Listen, redisURL)
	return d, nil
}

// checkFree fails, naming the address and the flag that changes it, when
// something already listens on listen.
//
// Caddy cannot be left to find out: its listeners set SO_REUSEPORT (so that a
// config reload can bind the port again while the old listener still holds
// it), and Linux lets a second socket with SO_REUSEPORT bind a port that a
// first one holds. A second demo on the same port would start without an
// error, and the kernel would split the browsers' connections between the
// two demos, each with its own embedded Redis: messages would reach some
// windows and not others. A plain listen sets no SO_REUSEPORT, so it fails
// while any socket holds the port. It is closed at once, before Caddy binds.
func checkFree(listen string) error {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return fmt.Errorf("-listen %q: want host:port: %w", listen, err)
	}
	l, err := net.Listen("tcp", listen)
	if err == nil {
		return l.Close()
	}
	hint := "choose another address with -listen"
	if n, convErr := strconv.Atoi(port); convErr == nil && n > 0 && n < 65535 {
		hint += ", for example -listen " + net.JoinHostPort(host, strconv.Itoa(n+1))
	}
	if errors.Is(err, syscall.EADDRINUSE) {
		return fmt.Errorf("%s is already in use (is another sse-demo running?): %s", listen, hint)
	}
	return fmt.Errorf("cannot listen on %s (%w): %s", listen, err, hint)
}

// stop stops Caddy, which ends every stream, then the embedded Redis.
func (d *demo) stop() error {
	err := caddy.Stop()
	d.closeRedis()
	return err
}

func (d *demo) closeRedis() {
	if d.redis != nil {
		d.redis.Close()
	}
}

// banner tells what to open and how to publish from a shell.
func (d *demo) banner(w io.Writer, listen, redisURL string) {
	host, port, _ := net.SplitHostPort(listen)
	ip := net.ParseIP(host)
	exposed := host != "localhost" && (ip == nil || !ip.IsLoopback())
	if host == "" || ip != nil && ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	base := "http://" + net.JoinHostPort(host, port)
	msg := `'{"event":"chat","data":{"text":"hi"}}'`

	var cli string
	if d.redis != nil {
		fmt.Fprintf(w, "caddy-sse demo (embedded fake Redis on %s; not for production)\n\n", d.redis.Addr())
		cli = "redis-cli -p " + d.redis.Port()
	} else {
		shown := redisURL
		if u, err := url.Parse(redisURL); err == nil {
			shown = u.Redacted()
		}
		fmt.Fprintf(w, "caddy-sse demo (Redis at %s)\n\n", shown)
		cli = "redis-cli -u " + shellQuote(shown)
	}
	fmt.Fprintf(w, "  Open:      %s/\n", base)
	fmt.Fprintf(w, "  Stream:    curl -N %s/events/lobby\n", base)
	fmt.Fprintf(w, "  Publish:   curl -d %s %s/publish/lobby\n", msg, base)
	fmt.Fprintf(w, "  or:        %s PUBLISH room:lobby %s\n", cli, msg)
	if exposed {
		fmt.Fprintf(w, "\n  Warning: listening on %s, beyond this machine: anyone who can reach it can publish.\n", listen)
	}
	fmt.Fprintf(w, "\nCtrl-C to stop.\n")
}

// caddyfileFor fills in the demo's Caddyfile.
func caddyfileFor(listen, redisURL string, verbose bool) (string, error) {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return "", fmt.Errorf("-listen %q: want host:port: %w", listen, err)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return "", fmt.Errorf("-listen %q: port must be a number from 1 to 65535", listen)
	}
	if strings.ContainsAny(host, " \t\r\n\"'`{}\\#") {
		return "", fmt.Errorf("-listen %q: invalid host", listen)
	}
	if err := checkRedisURL(redisURL); err != nil {
		return "", err
	}
	level := "WARN"
	if verbose {
		level = "INFO"
	}
	var b strings.Builder
	err = caddyfileTmpl.Execute(&b, struct {
		Host, Port, RedisURL, LogLevel string
	}{host, port, redisURL, level})
	return b.String(), err
}

// checkRedisURL refuses what is not a redis:// or rediss:// URL, and the
// characters that would change the meaning of the Caddyfile it goes into.
// Errors never repeat the URL, since it may hold a password.
func checkRedisURL(s string) error {
	lower := strings.ToLower(s)
	if !strings.HasPrefix(lower, "redis://") && !strings.HasPrefix(lower, "rediss://") {
		return errors.New("-redis: want a redis:// or rediss:// URL")
	}
	if strings.ContainsAny(s, " \t\r\n\"'`{}\\#") {
		return errors.New("-redis: the URL must not contain spaces, quotes, braces, backslashes or #")
	}
	return nil
}

// shellQuote quotes s for a POSIX shell when it needs it.
func shellQuote(s string) string {
	if s != "" && !strings.ContainsAny(s, " \t\n'\"\\$`!*?[]{}()<>|&;#~") {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

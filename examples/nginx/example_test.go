package nginx

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-sse/caddy-sse/examples/internal/exampletest"
	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

// mainConf is nginx.conf as Debian's nginx package installs it
// (/etc/nginx/nginx.conf of nginx-common), with what a test needs: one
// process in the foreground, every path in the test's own directory. Its
// http block keeps the stock settings that touch a proxied stream (gzip on,
// sendfile) and the two includes a site goes through: conf.d/*.conf, where
// the README puts caddy-sse.conf, then sites-enabled/*, where Debian enables
// its default site.
const mainConf = `daemon off;
master_process off;
pid {DIR}/nginx.pid;
error_log {DIR}/error.log info;
events {
	worker_connections 256;
}
http {
	sendfile on;
	tcp_nopush on;
	types_hash_max_size 2048;
	default_type application/octet-stream;
	access_log {DIR}/access.log;
	gzip on;
	client_body_temp_path {DIR}/client_body;
	proxy_temp_path {DIR}/proxy;
	fastcgi_temp_path {DIR}/fastcgi;
	uwsgi_temp_path {DIR}/uwsgi;
	scgi_temp_path {DIR}/scgi;
	include {DIR}/conf.d/*.conf;
	include {DIR}/sites-enabled/*;
}
`

// debianDefaultSite is Debian's stock default site
// (/etc/nginx/sites-available/default of nginx-common, enabled by a link in
// sites-enabled), without its comments and with its root in the test's
// directory. It answers 404 for anything that is not a file under its root.
const debianDefaultSite = `server {
	listen 80 default_server;
	listen [::]:80 default_server;
	root {DIR}/html;
	index index.html index.htm index.nginx-debian.html;
	server_name _;
	location / {
		try_files $uri $uri/ =404;
	}
}
`

// The README's steps that install the server block on Debian, which the
// layout of a test follows.
const (
	installStep       = "cp examples/nginx/caddy-sse.conf /etc/nginx/conf.d/"
	removeDefaultStep = "rm /etc/nginx/sites-enabled/default"
)

// port80 is the port of the shipped files, which a test moves to its own.
var port80 = regexp.MustCompile(`listen 80([ ;])`)

// nginxServer is a running nginx.
type nginxServer struct {
	addr string
	dir  string
}

// debianLayout writes nginx's configuration as on a Debian machine, in a
// directory of the test's own: site (the shipped server block) installed in
// conf.d/ as the README says, and Debian's default site left in
// sites-enabled/ unless removeDefault (the README's other step). Every
// server listens on one free loopback port instead of 80; the default
// site's IPv6 listener is left out, as the tests use 127.0.0.1 only. It
// returns the file to pass to nginx -c and the address nginx will listen on.
func debianLayout(t *testing.T, site string, removeDefault bool) (conf, addr string) {
	t.Helper()
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, step := range []string{installStep, removeDefaultStep} {
		if !strings.Contains(string(readme), "\n"+step) {
			t.Fatalf("the README no longer says %q: update the test with it", step)
		}
	}
	dir := t.TempDir()
	addr = fmt.Sprintf("127.0.0.1:%d", caddyproc.FreePort(t))
	listen := "listen " + addr + "$1"
	write := func(name, content string) {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		content = strings.ReplaceAll(content, "{DIR}", dir)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("nginx.conf", mainConf)
	write("html/index.nginx-debian.html", "Welcome to nginx!\n")
	write("conf.d/caddy-sse.conf", port80.ReplaceAllString(site, listen))
	if removeDefault {
		write("sites-enabled/.keep", "") // the directory stays, empty
	} else {
		def := strings.Replace(debianDefaultSite, "\tlisten [::]:80 default_server;\n", "", 1)
		write("sites-enabled/default", port80.ReplaceAllString(def, listen))
	}
	return filepath.Join(dir, "nginx.conf"), addr
}

// nginxT runs `nginx -t` on conf and returns its output.
func nginxT(t *testing.T, conf string) (string, error) {
	t.Helper()
	bin := exampletest.NeedBinary(t, "nginx", "apt-get install -y nginx")
	dir := filepath.Dir(conf)
	out, err := exec.Command(bin, "-e", filepath.Join(dir, "error.log"), "-p", dir, "-c", conf, "-t").CombinedOutput()
	return string(out), err
}

// startNginx runs nginx with site installed as the README says on a Debian
// machine (see debianLayout) and waits until it accepts connections. It
// fails the test, saying how to install nginx, when nginx is missing.
func startNginx(t *testing.T, site string) *nginxServer {
	t.Helper()
	conf, addr := debianLayout(t, site, true)
	return runNginx(t, conf, addr)
}

// runNginx checks conf with nginx -t, runs nginx with it and waits until it
// listens on addr.
func runNginx(t *testing.T, conf, addr string) *nginxServer {
	t.Helper()
	bin := exampletest.NeedBinary(t, "nginx", "apt-get install -y nginx")
	if out, err := nginxT(t, conf); err != nil {
		t.Fatalf("nginx -t: %v\n%s", err, out)
	}
	dir := filepath.Dir(conf)
	cmd := exec.Command(bin, "-e", filepath.Join(dir, "error.log"), "-p", dir, "-c", conf)
	exampletest.Serve(t, cmd, addr, 10*time.Second, func() string {
		log, _ := os.ReadFile(filepath.Join(dir, "error.log"))
		return string(log)
	})
	return &nginxServer{addr: addr, dir: dir}
}

func (n *nginxServer) URL() string { return "http://" + n.addr }

// setup runs the shipped Caddyfile with a real Redis in front of a test
// app, and returns it with the shipped nginx server block pointed at it.
func setup(t *testing.T) (*redistest.Server, *caddyproc.Instance, string, *[]string) {
	t.Helper()
	rs := redistest.Start(t)
	var mu sync.Mutex
	var forwardedFor []string
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		forwardedFor = append(forwardedFor, r.Header.Get("X-Forwarded-For"))
		mu.Unlock()
		io.WriteString(w, "app "+r.URL.Path)
	}))
	t.Cleanup(app.Close)
	in := caddyproc.Start(t, exampletest.Caddyfile(t, "Caddyfile",
		"http://:8000", "http://:{HTTP}",
		"redis://127.0.0.1:6379", rs.URL(),
		"reverse_proxy 127.0.0.1:8080", "reverse_proxy "+app.Listener.Addr().String(),
	), nil)
	site := exampletest.Substitute(t, "caddy-sse.conf",
		"server 127.0.0.1:8000;", "server "+in.Addr()+";",
		"listen 80 default_server;", "listen 80 default_server;", // checked here, moved by debianLayout
	)
	return rs, in, site, &forwardedFor
}

// eventsOneByOne publishes n events, each only after the previous one
// arrived, and fails if one takes longer than within.
func eventsOneByOne(t *testing.T, rs *redistest.Server, s *sseclient.Stream, n int, within time.Duration) {
	t.Helper()
	for i := 1; i <= n; i++ {
		msg := fmt.Sprintf("event %d", i)
		start := time.Now()
		if got := ssetest.Publish(t, rs.Client(), "user:42", msg); got != 1 {
			t.Fatalf("PUBLISH reached %d subscriptions", got)
		}
		ev, err := s.Next(within)
		if err != nil {
			t.Fatalf("%q did not arrive through nginx within %v: %v (received so far %q)", msg, within, err, s.Raw())
		}
		if ev.Data != msg {
			t.Fatalf("got %+v, want %q", ev, msg)
		}
		t.Logf("%s arrived after %v", msg, time.Since(start).Round(time.Millisecond))
	}
}

func TestNginxExample(t *testing.T) {
	caddyproc.SkipShort(t)
	rs, _, site, forwardedFor := setup(t)
	ngx := startNginx(t, site)

	// The app behind Caddy, through nginx.
	resp, err := http.Get(ngx.URL() + "/page")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "app /page" {
		t.Fatalf("GET /page through nginx = %d %q", resp.StatusCode, body)
	}
	// Caddy trusts nginx's X-Forwarded-For (trusted_proxies) and appends
	// nginx's address: the browser's address comes first. Without
	// trusted_proxies Caddy would drop it and send nginx's alone.
	if got := (*forwardedFor)[0]; got != "127.0.0.1, 127.0.0.1" {
		t.Fatalf("the app saw X-Forwarded-For %q, want the browser's then nginx's address", got)
	}

	s := ssetest.Open(t, ngx.URL()+"/events/42")
	if ct := s.Resp.Header.Get("Content-Type"); ct != "text/event-stream; charset=utf-8" {
		t.Fatalf("Content-Type through nginx = %q", ct)
	}
	if s.Resp.ProtoMinor != 1 || len(s.Resp.TransferEncoding) == 0 || s.Resp.TransferEncoding[0] != "chunked" {
		t.Fatalf("through nginx: %s, Transfer-Encoding %v; want HTTP/1.1 chunked", s.Resp.Proto, s.Resp.TransferEncoding)
	}
	// The opening comment comes through at once, before any event.
	deadline := time.Now().Add(2 * time.Second)
	for s.Raw() == "" && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := s.Raw(); got != ":\n" {
		t.Fatalf("before any event, nginx passed %q, want the opening comment", got)
	}
	eventsOneByOne(t, rs, s, 5, time.Second)
	want := ":\n"
	for i := 1; i <= 5; i++ {
		want += fmt.Sprintf("data: event %d\n\n", i)
	}
	if got := s.Raw(); got != want {
		t.Fatalf("bytes through nginx:\n%q\nwant\n%q", got, want)
	}

	// Refusals pass through with their status.
	resp, err = http.Get(ngx.URL() + "/events/not-a-number")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("GET /events/not-a-number through nginx = %d, want 403", resp.StatusCode)
	}
}

// The check above can fail: without the settings of the shipped location
// (buffering on, Caddy's X-Accel-Buffering ignored, gzip on for event
// streams), nginx holds the stream back and the same check does not see it
// in time.
func TestNginxBufferingIsDetected(t *testing.T) {
	caddyproc.SkipShort(t)
	rs, _, site, _ := setup(t)
	broken := strings.Replace(site, "proxy_buffering off;\n\t\tproxy_cache off;\n\t\tgzip off;",
		"proxy_buffering on;\n\t\tproxy_ignore_headers X-Accel-Buffering;\n\t\tgzip on;\n\t\tgzip_types text/event-stream;", 1)
	if broken == site {
		t.Fatal("the shipped caddy-sse.conf no longer has proxy_buffering off, proxy_cache off and gzip off in a row")
	}
	ngx := startNginx(t, broken)
	s, err := ssetest.TryOpen(ngx.URL()+"/events/42", 2*time.Second)
	if err != nil {
		t.Logf("with buffering, not even the headers arrived within 2s: %v", err)
		return
	}
	defer s.Close()
	ssetest.Publish(t, rs.Client(), "user:42", "held back")
	if ev, err := s.Next(time.Second); err == nil {
		t.Fatalf("with buffering and gzip, the event arrived at once (%+v): the check cannot tell a buffered stream", ev)
	}
}

// On a stock Debian nginx, whose default site also claims default_server
// on port 80, the README's step that removes it matters, and skipping it
// fails loudly: nginx -t refuses the configuration, naming the duplicate,
// instead of nginx starting and answering the streams with the default
// site's 404. The second half shows that this layout is what made the
// example fail before: a server block that is not default_server loses to
// the default site, and /events/ gets 404.
func TestNginxOnDebianDefaultSite(t *testing.T) {
	caddyproc.SkipShort(t)
	_, _, site, _ := setup(t)

	conf, _ := debianLayout(t, site, false)
	out, err := nginxT(t, conf)
	if err == nil {
		t.Fatalf("with Debian's default site still enabled, nginx -t accepted the configuration:\n%s", out)
	}
	if !strings.Contains(out, "a duplicate default server for 127.0.0.1:") {
		t.Fatalf("with Debian's default site still enabled, nginx -t failed without naming the duplicate default server:\n%s", out)
	}

	notDefault := strings.Replace(site, "listen 80 default_server;", "listen 80;", 1)
	conf, addr := debianLayout(t, notDefault, false)
	ngx := runNginx(t, conf, addr)
	resp, err := http.Get(ngx.URL() + "/events/42")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("without default_server, next to Debian's default site, GET /events/42 = %d %q; want the default site's 404", resp.StatusCode, body)
	}
}

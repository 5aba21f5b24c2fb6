package clients

import (
	"bytes"
	"context"
	"fmt"
	"image"
	"image/png"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
)

// The README's credentials for the live view's site ('change me').
const liveUser, livePassword = "ops", "change me"

// The Redis user of this test: the live view must never show it.
const liveRedisUser, liveRedisPassword = "live-view-redis-user", "live-view-S3cret-never-shown"

// readmeLiveBlock is the README's Caddyfile block that passes the live view
// through a site.
func readmeLiveBlock(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	var found []string
	for _, m := range regexp.MustCompile("(?s)```caddyfile\n(.*?)```").FindAllStringSubmatch(string(b), -1) {
		if strings.Contains(m[1], "/sse/live.json") {
			found = append(found, m[1])
		}
	}
	if len(found) != 1 {
		t.Fatalf("the README has %d Caddyfile blocks for the live view, want one", len(found))
	}
	return found[0]
}

// liveCaddyfile is a site with an sse route and the README's block, the
// admin endpoint on a free port instead of localhost:2019.
func liveCaddyfile(t *testing.T) string {
	t.Helper()
	block := readmeLiveBlock(t)
	if strings.Count(block, "localhost:2019") != 1 {
		t.Fatalf("the README's live view block should proxy to localhost:2019 once:\n%s", block)
	}
	block = strings.Replace(block, "localhost:2019", "127.0.0.1:{ADMIN}", 1)
	return caddyproc.GlobalOptions + `
http://127.0.0.1:{HTTP} {
	sse /events/* {
		redis {REDIS}
		channel room:{path.1}
	}
	` + strings.ReplaceAll(strings.TrimSpace(block), "\n", "\n\t") + `
}
`
}

// liveDOM is what the test reads of the page.
type liveDOM struct {
	Updated   string                       `json:"updated"`
	Error     string                       `json:"error"`
	Streams   string                       `json:"streams"`
	Channels  string                       `json:"channels"`
	Delivered float64                      `json:"delivered"`
	RateIn    string                       `json:"rateIn"`
	RateOut   string                       `json:"rateOut"`
	Points    int                          `json:"points"`
	Delivery  string                       `json:"delivery"` // the polyline of events to clients
	Redis     []string                     `json:"redis"`
	Text      string                       `json:"text"`
	CSP       []string                     `json:"csp"`
	Chart     struct{ X, Y, W, H float64 } `json:"chart"`
}

const liveDOMExpr = `(() => {
	const $ = (id) => document.getElementById(id);
	return {
		updated: $("updated").textContent,
		error: $("error").textContent,
		streams: $("streams").textContent,
		channels: $("channels").textContent,
		delivered: Number($("delivered").dataset.value || 0),
		rateIn: $("rate-in").textContent,
		rateOut: $("rate-out").textContent,
		points: Number($("chart").dataset.points || 0),
		delivery: $("chart").querySelector('polyline[data-series="delivered"]')?.getAttribute("points") || "",
		redis: [...document.querySelectorAll("#redis td")].map((td) => td.textContent),
		text: document.body.innerText,
		csp: window.__csp,
		chart: (({ left, top, width, height }) => ({ X: left + scrollX, Y: top + scrollY, W: width, H: height }))($("chart").getBoundingClientRect()),
	};
})()`

// The live view in headless Chromium, reached as the README says (through a
// site, behind basic_auth): the page draws; as events flow its counters go
// up and the chart gets points above zero; Redis shows as connected, by
// address, without credentials; no Content-Security-Policy violation; the
// screenshot shows the chart's colours.
func TestLiveViewInChromium(t *testing.T) {
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	ctx := context.Background()
	redisURL := rs.AddUser(t, liveRedisUser, liveRedisPassword, "~*", "&*", "+@all")
	in := caddyproc.Start(t, liveCaddyfile(t), caddyproc.Options{"{REDIS}": redisURL})
	pub := redis.NewClient(&redis.Options{Addr: rs.Addr(), Username: liveRedisUser, Password: liveRedisPassword})
	defer pub.Close()

	// Listeners: three on room:lobby, one on room:news.
	var streams []*sseclient.Stream
	for _, room := range []string{"lobby", "lobby", "lobby", "news"} {
		s, err := sseclient.Get(ctx, in.URL()+"/events/"+room)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(s.Close)
		streams = append(streams, s)
	}
	// publish sends n events to room:lobby over about n/10 seconds and
	// waits until the three streams on it have them.
	publish := func(n int) {
		t.Helper()
		for i := 0; i < n; i++ {
			if err := pub.Publish(ctx, "room:lobby", "tick "+strconv.Itoa(i)).Err(); err != nil {
				t.Fatal(err)
			}
			time.Sleep(100 * time.Millisecond)
		}
		for _, s := range streams[:3] {
			for i := 0; i < n; i++ {
				if _, err := s.Next(5 * time.Second); err != nil {
					t.Fatalf("stream: %v", err)
				}
			}
		}
	}

	// Without the password the site refuses both routes; the rest of the
	// admin API is not there at all.
	for _, path := range []string{"/sse/live", "/sse/live.json", "/sse/channels", "/config/"} {
		want := http.StatusUnauthorized
		if !strings.HasPrefix(path, "/sse/live") {
			want = http.StatusOK // the site's own empty answer, not the admin API's
		}
		resp, err := http.Get(in.URL() + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want || (want == http.StatusOK && len(body) != 0) {
			t.Fatalf("GET %s through the site without credentials: %d %q, want %d", path, resp.StatusCode, body, want)
		}
	}

	p := startPages(t, "chromium")
	p.do(t, map[string]any{"cmd": "authenticate", "username": liveUser, "password": livePassword})
	if status := p.goTo(t, in.URL()+"/sse/live"); status != 200 {
		t.Fatalf("the live view: %d", status)
	}
	p.wait(t, `document.getElementById("updated").textContent.startsWith("updated")`, 60*time.Second)

	read := func() liveDOM {
		t.Helper()
		var d liveDOM
		p.eval(t, &d, liveDOMExpr)
		if d.Error != "" || len(d.CSP) > 0 {
			t.Fatalf("the page says %q; CSP violations %q", d.Error, d.CSP)
		}
		return d
	}

	publish(15)
	p.wait(t, `Number(document.getElementById("delivered").dataset.value) >= 45 && Number(document.getElementById("chart").dataset.points) >= 2`, 15*time.Second)
	first := read()
	publish(25)
	p.wait(t, `Number(document.getElementById("delivered").dataset.value) >= 120`, 15*time.Second)
	// Two more samples, so that the chart has the second burst.
	p.wait(t, fmt.Sprintf(`Number(document.getElementById("chart").dataset.points) >= %d`, first.Points+3), 15*time.Second)
	second := read()

	if first.Streams != "4" || second.Streams != "4" || second.Channels != "2" {
		t.Fatalf("streams %q then %q, channels %q: want 4 streams on 2 channels", first.Streams, second.Streams, second.Channels)
	}
	if !(second.Delivered > first.Delivered && second.Delivered >= 120) {
		t.Fatalf("events delivered %v, then %v: want them to go up to 120", first.Delivered, second.Delivered)
	}
	if second.Points <= first.Points {
		t.Fatalf("the chart had %d points, then %d: want more", first.Points, second.Points)
	}
	// The chart of events to clients: points from left to right, some of
	// them above the baseline (y grows downwards; the baseline is the
	// largest y).
	pts := strings.Fields(second.Delivery)
	if len(pts) != second.Points {
		t.Fatalf("the delivery line has %d points, the chart says %d", len(pts), second.Points)
	}
	var ys []float64
	prevX := -1.0
	for _, pt := range pts {
		var x, y float64
		if _, err := fmt.Sscanf(pt, "%f,%f", &x, &y); err != nil {
			t.Fatalf("point %q: %v", pt, err)
		}
		if x < prevX {
			t.Fatalf("the line goes back in time: %s", second.Delivery)
		}
		prevX = x
		ys = append(ys, y)
	}
	base, top := ys[0], ys[0]
	for _, y := range ys {
		base, top = max(base, y), min(top, y)
	}
	if base-top < 50 {
		t.Fatalf("the delivery line is flat (%s): want events per second drawn", second.Delivery)
	}
	// Redis: by address, connected, no credentials anywhere on the page.
	if len(second.Redis) < 6 || second.Redis[1] != rs.Addr() || second.Redis[4] != "connected" {
		t.Fatalf("the Redis table shows %q, want %s connected", second.Redis, rs.Addr())
	}
	for _, secret := range []string{liveRedisUser, liveRedisPassword} {
		if strings.Contains(second.Text, secret) {
			t.Fatalf("the page shows the Redis credentials (%q)", secret)
		}
	}
	t.Logf("the page: delivered %v -> %v, %d -> %d points, events/s from Redis %s, to clients %s",
		first.Delivered, second.Delivered, first.Points, second.Points, second.RateIn, second.RateOut)

	shot := filepath.Join(t.TempDir(), "live.png")
	p.screenshot(t, shot)
	if keep := os.Getenv("LIVE_SCREENSHOT"); keep != "" {
		b, _ := os.ReadFile(shot)
		if err := os.WriteFile(keep, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	c := second.Chart
	checkLiveScreenshot(t, shot, image.Rect(int(c.X), int(c.Y), int(c.X+c.W), int(c.Y+c.H)))
}

// checkLiveScreenshot checks that the PNG is a page with a chart: large
// enough, many colours, and in the chart's rectangle pixels of both of its
// lines (blue: events from Redis, green: to clients).
func checkLiveScreenshot(t *testing.T, path string, chart image.Rectangle) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	img, err := png.Decode(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	r := img.Bounds()
	if r.Dx() < 700 || r.Dy() < 500 {
		t.Fatalf("screenshot of %dx%d", r.Dx(), r.Dy())
	}
	near := func(c [3]int, x, y int) bool {
		cr, cg, cb, _ := img.At(x, y).RGBA()
		d := func(a uint32, b int) int { return max(int(a>>8)-b, b-int(a>>8)) }
		return d(cr, c[0]) < 40 && d(cg, c[1]) < 40 && d(cb, c[2]) < 40
	}
	if !chart.In(r) || chart.Dx() < 600 || chart.Dy() < 150 {
		t.Fatalf("the chart is at %v in a screenshot of %v", chart, r)
	}
	blue, green := [3]int{0x1f, 0x6f, 0xeb}, [3]int{0x2d, 0xa4, 0x4e}
	colours := map[uint32]bool{}
	var blues, greens int
	for y := r.Min.Y; y < r.Max.Y; y++ {
		for x := r.Min.X; x < r.Max.X; x++ {
			cr, cg, cb, _ := img.At(x, y).RGBA()
			colours[cr>>8<<16|cg>>8<<8|cb>>8] = true
			if !(image.Point{x, y}).In(chart) {
				continue
			}
			if near(blue, x, y) {
				blues++
			}
			if near(green, x, y) {
				greens++
			}
		}
	}
	if len(colours) < 50 || blues < 40 || greens < 40 {
		t.Fatalf("screenshot %s: %d colours; in the chart %d blue and %d green pixels: want a page with both lines drawn", path, len(colours), blues, greens)
	}
	t.Logf("screenshot %dx%d: %d colours; in the chart %d blue and %d green pixels", r.Dx(), r.Dy(), len(colours), blues, greens)
}

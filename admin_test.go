package caddysse_test

import (
	"context"
	"encoding/json"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

// The admin API test's credentials: they must never appear in its answers.
const (
	adminTestUser     = "sse-admin-test-user"
	adminTestPassword = "s3cret-Pa55-never-shown"
)

var adminCaddyfile = globalOptions + `
http://127.0.0.1:{HTTP} {
	sse /a/* {
		redis {REDIS_A}
		channel user:{path.1}
	}
	# The same Redis as /a/: the same hub, the same subscriptions.
	sse /again/* {
		redis {REDIS_A}
		channel user:{path.1}
		keepalive 5s
	}
	sse /b/* {
		redis {REDIS_B}
		channel room:{path.1}
	}
}
`

type adminChannels struct {
	Streams  int64 `json:"streams"`
	Channels int   `json:"channels"`
	Hubs     int   `json:"hubs"`
	Redis    []struct {
		Redis struct {
			Mode       string   `json:"mode"`
			Addrs      []string `json:"addrs"`
			MasterName string   `json:"master_name"`
			DB         int      `json:"db"`
			TLS        bool     `json:"tls"`
		} `json:"redis"`
		Channels    int            `json:"channels"`
		Subscribers map[string]int `json:"subscribers"`
	} `json:"redis"`
}

func adminGet(t *testing.T, in *caddyproc.Instance, path string) (int, http.Header, string) {
	t.Helper()
	return ssetest.Do(t, http.MethodGet, in.AdminURL()+path, "")
}

func TestAdminAPIChannelsAndStats(t *testing.T) {
	caddyproc.SkipShort(t)
	// Redis A needs a username and password; Redis B none.
	rsA := redistest.Start(t)
	ctx := context.Background()
	urlA := rsA.AddUser(t, adminTestUser, adminTestPassword, "~*", "&*", "+@all")
	rsB := redistest.Start(t)
	in := caddyproc.Start(t, adminCaddyfile, caddyproc.Options{"{REDIS_A}": urlA, "{REDIS_B}": rsB.URL()})

	// Nothing open yet: the routes answer with zeros, not an error.
	code, hdr, body := adminGet(t, in, "/sse/stats")
	if code != http.StatusOK || !strings.HasPrefix(hdr.Get("Content-Type"), "application/json") {
		t.Fatalf("GET /sse/stats: %d %q %s", code, hdr.Get("Content-Type"), body)
	}

	open := func(path string) *sseclient.Stream {
		t.Helper()
		s, err := sseclient.Get(ctx, in.URL()+path)
		if err != nil {
			t.Fatalf("open %s: %v", path, err)
		}
		t.Cleanup(s.Close)
		return s
	}
	streams := []*sseclient.Stream{
		open("/a/1"), open("/a/1"), open("/again/1"), open("/a/2"), open("/b/lobby"),
	}

	// The streams are real: one PUBLISH reaches the three on user:1.
	pubA := redis.NewClient(&redis.Options{Addr: rsA.Addr(), Username: adminTestUser, Password: adminTestPassword})
	defer pubA.Close()
	if n, err := pubA.Publish(ctx, "user:1", "hi").Result(); err != nil || n != 1 {
		t.Fatalf("PUBLISH user:1: %d subscriptions, %v (want 1: one per instance)", n, err)
	}
	for _, s := range streams[:3] {
		if ev, err := s.Next(5 * time.Second); err != nil || ev.Data != "hi" {
			t.Fatalf("stream on user:1 got %+v, %v", ev, err)
		}
	}

	code, hdr, body = adminGet(t, in, "/sse/channels")
	if code != http.StatusOK || !strings.HasPrefix(hdr.Get("Content-Type"), "application/json") {
		t.Fatalf("GET /sse/channels: %d %q %s", code, hdr.Get("Content-Type"), body)
	}
	for _, secret := range []string{adminTestPassword, adminTestUser, urlA} {
		if strings.Contains(body, secret) {
			t.Fatalf("GET /sse/channels shows the Redis credentials (%q):\n%s", secret, body)
		}
	}
	var got adminChannels
	if err := json.Unmarshal([]byte(body), &got); err != nil {
		t.Fatalf("GET /sse/channels is not JSON: %v\n%s", err, body)
	}
	if got.Streams != 5 || got.Channels != 3 || got.Hubs != 2 || len(got.Redis) != 2 {
		t.Fatalf("totals: streams %d, channels %d, hubs %d (want 5, 3, 2):\n%s", got.Streams, got.Channels, got.Hubs, body)
	}
	byAddr := map[string]int{}
	for i, h := range got.Redis {
		if h.Redis.Mode != "single" || len(h.Redis.Addrs) != 1 || h.Redis.DB != 0 || h.Redis.TLS {
			t.Fatalf("hub %d described as %+v:\n%s", i, h.Redis, body)
		}
		byAddr[h.Redis.Addrs[0]] = i
	}
	a, okA := byAddr[rsA.Addr()]
	b, okB := byAddr[rsB.Addr()]
	if !okA || !okB {
		t.Fatalf("hubs are not described by their addresses %s and %s:\n%s", rsA.Addr(), rsB.Addr(), body)
	}
	if want := map[string]int{"user:1": 3, "user:2": 1}; !reflect.DeepEqual(got.Redis[a].Subscribers, want) || got.Redis[a].Channels != 2 {
		t.Fatalf("Redis A: %d channels %v, want 2 channels %v", got.Redis[a].Channels, got.Redis[a].Subscribers, want)
	}
	if want := map[string]int{"room:lobby": 1}; !reflect.DeepEqual(got.Redis[b].Subscribers, want) || got.Redis[b].Channels != 1 {
		t.Fatalf("Redis B: %d channels %v, want 1 channel %v", got.Redis[b].Channels, got.Redis[b].Subscribers, want)
	}

	code, _, body = adminGet(t, in, "/sse/stats")
	if code != http.StatusOK {
		t.Fatalf("GET /sse/stats: %d %s", code, body)
	}
	var stats struct {
		Streams, Channels, Hubs int
		Instance                string
		Redis                   []struct {
			Redis     struct{ Addrs []string }
			Connected bool
			Since     time.Time
		}
	}
	if err := json.Unmarshal([]byte(body), &stats); err != nil {
		t.Fatalf("GET /sse/stats is not JSON: %v\n%s", err, body)
	}
	if stats.Streams != 5 || stats.Channels != 3 || stats.Hubs != 2 || stats.Instance == "" {
		t.Fatalf("GET /sse/stats totals: want 5 streams, 3 channels, 2 hubs and the instance:\n%s", body)
	}
	// The state of each Redis subscription, and since when, without the
	// credentials.
	if len(stats.Redis) != 2 || strings.Contains(body, adminTestPassword) || strings.Contains(body, adminTestUser) {
		t.Fatalf("GET /sse/stats: want the state of 2 Redis subscriptions, no credentials:\n%s", body)
	}
	for _, r := range stats.Redis {
		if !r.Connected || r.Since.IsZero() || time.Since(r.Since) > time.Minute {
			t.Fatalf("GET /sse/stats: Redis %v connected %v since %v:\n%s", r.Redis.Addrs, r.Connected, r.Since, body)
		}
	}

	// Streams that end leave the counts, and channels nobody listens to
	// any more leave the list.
	streams[3].Close() // the only one on user:2
	streams[0].Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, _, body = adminGet(t, in, "/sse/channels")
		got = adminChannels{}
		if err := json.Unmarshal([]byte(body), &got); err != nil {
			t.Fatal(err)
		}
		if got.Streams == 3 && got.Channels == 2 &&
			reflect.DeepEqual(got.Redis[a].Subscribers, map[string]int{"user:1": 2}) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after closing two streams, want 3 streams, user:1 with 2 and no user:2:\n%s", body)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// Read-only routes.
	resp, err := http.Post(in.AdminURL()+"/sse/stats", "application/json", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("POST /sse/stats: %d, want 405", resp.StatusCode)
	}
}

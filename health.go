package caddysse

// This file holds the `sse_health` handler, a route a load balancer probes:
// 200 while this instance's Redis subscription is up, 503 with the reason
// while it is not; and the Redis state that /sse/stats shows.

import (
	"encoding/json"
	"net/http"
	"sort"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	caddy.RegisterModule(Health{})
}

// Health is the `sse_health` handler: it answers 200 while the instance's
// Redis subscription connection (the one the streams of that Redis share)
// is up with every channel confirmed, and 503 with the reason while it is
// not, so that a load balancer sends new streams elsewhere.
type Health struct {
	// Redis whose subscription is checked; as in the sse handler (the same
	// default), so that it names the connection the streams use.
	Redis *RedisConfig `json:"redis,omitempty"`

	hub    *hub
	hubKey string
}

// CaddyModule returns the Caddy module information.
func (Health) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.sse_health",
		New: func() caddy.Module { return new(Health) },
	}
}

// Provision takes a reference to the hub of its Redis.
func (hl *Health) Provision(ctx caddy.Context) error {
	if err := proc().metrics.register(ctx.GetMetricsRegistry()); err != nil {
		return err
	}
	hb, key, err := acquireHub(hl.Redis)
	if err != nil {
		return err
	}
	hl.hub, hl.hubKey = hb, key
	return nil
}

// Validate refuses a Redis configuration the Caddyfile would refuse.
func (hl *Health) Validate() error { return hl.Redis.validate() }

// Cleanup drops this config's reference to the hub.
func (hl *Health) Cleanup() error {
	if hl.hub == nil {
		return nil
	}
	return releaseHub(hl.hubKey)
}

// healthAnswer is the body of an sse_health answer.
type healthAnswer struct {
	// Status is "up" or "down".
	Status string `json:"status"`
	// Reason says what is wrong while down.
	Reason string `json:"reason,omitempty"`
	// Since is when the subscription came up, or went down.
	Since string `json:"since"`
	// Instance is this process's name in Redis.
	Instance string `json:"instance"`
}

// ServeHTTP answers the probe.
func (hl *Health) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		return refusal(w, r, http.StatusMethodNotAllowed, "method not allowed: use GET or HEAD")
	}
	up, since := hl.hub.brk.State()
	ans := healthAnswer{Status: "up", Since: since.UTC().Format(time.RFC3339), Instance: proc().instance}
	status := http.StatusOK
	if !up {
		ans.Status = "down"
		ans.Reason = "redis subscription down since " + ans.Since
		status = http.StatusServiceUnavailable
	}
	body, _ := json.Marshal(ans)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	if r.Method != http.MethodHead {
		_, _ = w.Write(append(body, '\n'))
	}
	return nil
}

// redisState is one Redis configuration's subscription state in
// /sse/stats.
type redisState struct {
	Redis     redisDescription `json:"redis"`
	Connected bool             `json:"connected"`
	// Since is when the subscription came up, or went down.
	Since string `json:"since"`
}

// statsWithRedis is the answer of GET /sse/stats: the totals, this
// process's name in Redis, and the state of each Redis subscription.
type statsWithRedis struct {
	adminStats
	Instance string       `json:"instance"`
	Redis    []redisState `json:"redis"`
}

// withRedisState adds the Redis state to the totals.
func withRedisState(s adminStats) statsWithRedis {
	out := statsWithRedis{adminStats: s, Instance: proc().instance, Redis: []redisState{}}
	proc().hubs.Range(func(key, value any) bool {
		if h, ok := value.(*hub); ok {
			up, since := h.brk.State()
			out.Redis = append(out.Redis, redisState{Redis: describeHubKey(key), Connected: up,
				Since: since.UTC().Format(time.RFC3339)})
		}
		return true
	})
	sort.Slice(out.Redis, func(i, j int) bool {
		return out.Redis[i].Redis.sortKey() < out.Redis[j].Redis.sortKey()
	})
	return out
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Health)(nil)
	_ caddy.Validator             = (*Health)(nil)
	_ caddy.CleanerUpper          = (*Health)(nil)
	_ caddyhttp.MiddlewareHandler = (*Health)(nil)
)

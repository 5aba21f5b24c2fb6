package caddysse

import (
	"encoding/json"
	"net/http"
	"sort"
	"strings"

	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// adminAPI is the admin.api.sse module: it adds read-only routes about the
// streams of this Caddy instance to Caddy's admin endpoint.
//
//	GET /sse/channels   every channel with its subscriber count, per Redis
//	                    configuration, and the totals
//	GET /sse/stats      the totals, this instance's id, and each Redis's state
//	GET /sse/live       the live view: a page that draws /sse/live.json
//	GET /sse/live.json  counters, rates over the last ten minutes, Redis state
//
// Redis configurations are described by their addresses, mode, database and
// TLS; never by their username or password.
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.sse",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Routes returns the admin routes of the module.
func (adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: "/sse/channels", Handler: caddy.AdminHandlerFunc(handleChannels)},
		{Pattern: "/sse/stats", Handler: caddy.AdminHandlerFunc(handleStats)},
		{Pattern: "/sse/live", Handler: caddy.AdminHandlerFunc(handleLivePage)},
		{Pattern: "/sse/live.json", Handler: caddy.AdminHandlerFunc(handleLiveJSON)},
	}
}

// adminStats are the totals of this instance.
type adminStats struct {
	// Streams open on this instance, across every config and Redis.
	Streams int64 `json:"streams"`
	// Channels subscribed, summed over the Redis configurations.
	Channels int `json:"channels"`
	// Hubs is the number of Redis configurations in use.
	Hubs int `json:"hubs"`
}

// adminChannels is the answer of GET /sse/channels.
type adminChannels struct {
	adminStats
	Redis []adminHub `json:"redis"`
}

// adminHub is one Redis configuration (one shared subscription connection)
// and the channels subscribed through it.
type adminHub struct {
	Redis redisDescription `json:"redis"`
	// Channels is the number of channels subscribed.
	Channels int `json:"channels"`
	// Subscribers maps each channel to the number of streams on it.
	Subscribers map[string]int `json:"subscribers"`
}

// redisDescription tells which Redis a hub uses, without credentials.
type redisDescription struct {
	Mode       string   `json:"mode"` // single, sentinel, cluster, sharded
	Addrs      []string `json:"addrs"`
	MasterName string   `json:"master_name,omitempty"`
	DB         int      `json:"db"`
	TLS        bool     `json:"tls"`
}

func (d redisDescription) sortKey() string {
	return d.Mode + " " + strings.Join(d.Addrs, ",") + " " + d.MasterName
}

func handleChannels(w http.ResponseWriter, r *http.Request) error {
	if err := onlyGet(w, r); err != nil {
		return err
	}
	out := adminChannels{Redis: []adminHub{}}
	proc().hubs.Range(func(key, value any) bool {
		h, ok := value.(*hub)
		if !ok {
			return true
		}
		snap := h.reg.Snapshot()
		subs := snap.Subscribers
		if subs == nil {
			subs = map[string]int{}
		}
		out.Redis = append(out.Redis, adminHub{
			Redis:       describeHubKey(key),
			Channels:    snap.Channels,
			Subscribers: subs,
		})
		out.Channels += snap.Channels
		return true
	})
	sort.Slice(out.Redis, func(i, j int) bool {
		return out.Redis[i].Redis.sortKey() < out.Redis[j].Redis.sortKey()
	})
	out.Hubs = len(out.Redis)
	out.Streams = proc().streams.Load()
	return writeAdminJSON(w, r, out)
}

func handleStats(w http.ResponseWriter, r *http.Request) error {
	if err := onlyGet(w, r); err != nil {
		return err
	}
	var out adminStats
	proc().hubs.Range(func(_, value any) bool {
		if h, ok := value.(*hub); ok {
			out.Channels += h.reg.Snapshot().Channels
			out.Hubs++
		}
		return true
	})
	out.Streams = proc().streams.Load()
	return writeAdminJSON(w, r, withRedisState(out))
}

func onlyGet(w http.ResponseWriter, r *http.Request) error {
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		return nil
	}
	w.Header().Set("Allow", "GET, HEAD")
	return caddy.APIError{
		HTTPStatus: http.StatusMethodNotAllowed,
		Err:        errMethod,
	}
}

type adminError string

func (e adminError) Error() string { return string(e) }

const errMethod = adminError("method not allowed: use GET")

func writeAdminJSON(w http.ResponseWriter, r *http.Request, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	if r.Method == http.MethodHead {
		return nil
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// Interface guards
var _ caddy.AdminRouter = (*adminAPI)(nil)

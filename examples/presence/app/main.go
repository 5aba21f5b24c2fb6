// Command app stands for an existing app that knows nothing of SSE. Caddy
// holds the browsers' streams; the app only talks to Redis:
//
//   - it follows the lifecycle stream Caddy writes (XREAD) and, when a user
//     connects, publishes a greeting and what was pending for them to their
//     channel;
//   - GET /internal/online?user=<id> says whether the user is connected, on
//     any Caddy instance, and with how many streams (FCALL sse_presence);
//   - POST /internal/notify?user=<id> (the text as body) publishes to the
//     user at once if they are connected, else keeps it for their next
//     connection.
//
// Run it beside the example's Caddyfile:
//
//	REDIS_URL=redis://127.0.0.1:6379 LISTEN=127.0.0.1:8080 go run ./examples/presence/app
package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// lifecycleKey is the stream named by `lifecycle` in the Caddyfile.
const lifecycleKey = "sse:lifecycle"

type app struct {
	rdb *redis.Client

	mu      sync.Mutex
	pending map[string][]string // messages for users who were offline
}

func main() {
	opts, err := redis.ParseURL(env("REDIS_URL", "redis://127.0.0.1:6379"))
	if err != nil {
		log.Fatal(err)
	}
	a := &app{rdb: redis.NewClient(opts), pending: map[string][]string{}}
	ctx := context.Background()
	// Follow the stream from what is in it now: the connections that
	// happen from here on.
	from, err := a.lastID(ctx)
	if err != nil {
		log.Fatal(err)
	}
	go a.follow(ctx, from)

	http.HandleFunc("GET /internal/online", a.online)
	http.HandleFunc("POST /internal/notify", a.notify)
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "the app's page "+r.URL.Path+"\n")
	})
	log.Fatal(http.ListenAndServe(env("LISTEN", "127.0.0.1:8080"), nil))
}

// lastID is the id of the lifecycle stream's last entry, 0-0 if it has
// none.
func (a *app) lastID(ctx context.Context) (string, error) {
	last, err := a.rdb.XRevRangeN(ctx, lifecycleKey, "+", "-", 1).Result()
	if err != nil || len(last) == 0 {
		return "0-0", err
	}
	return last[0].ID, nil
}

// follow reads the lifecycle entries after id, forever. One process reads
// them all; with several app processes, a consumer group (XREADGROUP and
// XACK) shares them out and resumes after a restart.
func (a *app) follow(ctx context.Context, id string) {
	for {
		res, err := a.rdb.XRead(ctx, &redis.XReadArgs{
			Streams: []string{lifecycleKey, id}, Count: 100, Block: 5 * time.Second,
		}).Result()
		if errors.Is(err, redis.Nil) {
			continue // nothing within 5 s
		}
		if err != nil {
			log.Printf("reading %s: %v", lifecycleKey, err)
			time.Sleep(time.Second)
			continue
		}
		for _, e := range res[0].Messages {
			id = e.ID
			user, _ := e.Values["identity"].(string)
			if e.Values["type"] == "open" && user != "" {
				a.greet(ctx, user)
			}
		}
	}
}

// greet publishes a welcome and what was pending to the user's channel:
// the stream that just opened is subscribed already.
func (a *app) greet(ctx context.Context, user string) {
	a.mu.Lock()
	msgs := a.pending[user]
	delete(a.pending, user)
	a.mu.Unlock()
	a.publish(ctx, user, "Welcome, "+user)
	for _, m := range msgs {
		a.publish(ctx, user, m)
	}
}

func (a *app) publish(ctx context.Context, user, text string) {
	payload, _ := json.Marshal(map[string]string{"text": text})
	if err := a.rdb.Publish(ctx, "user:"+user, payload).Err(); err != nil {
		log.Printf("publish to %s: %v", user, err)
	}
}

// streams is how many streams user has open on their channel, across every
// Caddy instance: FCALL sse_presence returns identity, count, ...
func (a *app) streams(ctx context.Context, user string) (int64, error) {
	v, err := a.rdb.FCall(ctx, "sse_presence", []string{"{sse}:presence:user:" + user}).Slice()
	if err != nil {
		return 0, err
	}
	for i := 0; i+1 < len(v); i += 2 {
		if v[i] == user {
			n, _ := v[i+1].(int64)
			return n, nil
		}
	}
	return 0, nil
}

func (a *app) online(w http.ResponseWriter, r *http.Request) {
	user := r.URL.Query().Get("user")
	n, err := a.streams(r.Context(), user)
	if err != nil {
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{"user": user, "online": n > 0, "streams": n})
}

func (a *app) notify(w http.ResponseWriter, r *http.Request) {
	user := r.URL.Query().Get("user")
	body, err := io.ReadAll(io.LimitReader(r.Body, 4096))
	if err != nil || user == "" {
		http.Error(w, "want ?user= and a body", http.StatusBadRequest)
		return
	}
	n, err := a.streams(r.Context(), user)
	if err != nil {
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	if n > 0 {
		a.publish(r.Context(), user, string(body))
		io.WriteString(w, "delivered\n")
		return
	}
	// Offline: kept for the next connection. (A real app keeps it in its
	// database; a user who connects between the check and this line gets
	// it at their next connection.)
	a.mu.Lock()
	a.pending[user] = append(a.pending[user], string(body))
	a.mu.Unlock()
	io.WriteString(w, "pending\n")
}

func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

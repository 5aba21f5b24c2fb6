// Command app is the "legacy app" of the ai-typewriter example: it checks the
// session as it always did, answers POST /chat at once with a header naming
// a fresh Redis channel, and then publishes the answer to that channel a few
// characters at a time. Caddy, in front of it, holds the browser's connection
// as a Server-Sent Events stream; the app never does.
//
//	go run ./examples/ai-typewriter/app -listen 127.0.0.1:8080
package main

import (
	"context"
	crand "crypto/rand"
	"crypto/subtle"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"hash/fnv"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode"

	"github.com/redis/go-redis/v9"
)

//go:embed index.html
var indexHTML []byte

const (
	// sessionCookie stands in for the legacy app's login session.
	sessionCookie = "session"
	// maxQuestion bounds the question, in characters.
	maxQuestion = 200
	// publishTries bounds the retries of one FCALL: the first publishes may
	// come before Caddy has loaded sse_publish into Redis.
	publishTries = 5
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(2)
		}
		fmt.Fprintln(os.Stderr, "app:", err)
		os.Exit(1)
	}
}

// run serves until ctx is done, then stops every answer still being
// published and returns.
func run(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("app", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:8080", "address to serve on (keep it on loopback: Caddy is the front door)")
	redisURL := fs.String("redis", envOr("REDIS_URL", "redis://127.0.0.1:6379"), "Redis to publish to (default $REDIS_URL)")
	token := fs.String("token", "demo-token", "the session token: sent as the session cookie by GET /, or as Authorization: Bearer")
	minDelay := fs.Duration("min-delay", 100*time.Millisecond, "shortest pause between two chunks")
	maxDelay := fs.Duration("max-delay", 300*time.Millisecond, "longest pause between two chunks")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *minDelay < 0 || *maxDelay < *minDelay {
		return fmt.Errorf("need 0 <= -min-delay <= -max-delay, got %v and %v", *minDelay, *maxDelay)
	}
	if *token == "" {
		return errors.New("-token must not be empty")
	}
	opts, err := redis.ParseURL(*redisURL)
	if err != nil {
		return fmt.Errorf("-redis: %w", err)
	}
	rdb := redis.NewClient(opts)
	defer rdb.Close()

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	logger := log.New(stderr, "app: ", log.LstdFlags)
	a := newApp(ctx, rdb, *token, *minDelay, *maxDelay, logger)
	srv := &http.Server{
		Handler:           a,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		ErrorLog:          logger,
	}
	logger.Printf("listening on http://%s (publishing to %s)", ln.Addr(), opts.Addr)

	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case err = <-served:
	case <-ctx.Done():
		shutCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err = srv.Shutdown(shutCtx)
		cancel()
	}
	a.wait()
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// app is the HTTP handler of the legacy app.
type app struct {
	mux      *http.ServeMux
	rdb      redis.Cmdable
	token    string
	minDelay time.Duration
	maxDelay time.Duration
	log      *log.Logger

	ctx     context.Context // done: stop publishing
	answers sync.WaitGroup  // answers being published
}

func newApp(ctx context.Context, rdb redis.Cmdable, token string, minDelay, maxDelay time.Duration, logger *log.Logger) *app {
	a := &app{
		mux: http.NewServeMux(), rdb: rdb, token: token,
		minDelay: minDelay, maxDelay: maxDelay, log: logger, ctx: ctx,
	}
	a.mux.HandleFunc("GET /{$}", a.page)
	a.mux.HandleFunc("POST /chat", a.startChat)
	a.mux.HandleFunc("GET /chat/{id}", a.followChat)
	return a
}

func (a *app) ServeHTTP(w http.ResponseWriter, r *http.Request) { a.mux.ServeHTTP(w, r) }

// wait returns once every answer has been published or abandoned.
func (a *app) wait() { a.answers.Wait() }

// page serves the chat page and, standing in for a login, the session cookie.
func (a *app) page(w http.ResponseWriter, _ *http.Request) {
	http.SetCookie(w, &http.Cookie{
		Name: sessionCookie, Value: a.token, Path: "/",
		HttpOnly: true, SameSite: http.SameSiteStrictMode,
	})
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	_, _ = w.Write(indexHTML)
}

// authorized is the legacy app's own check: a bearer token for API clients,
// the session cookie for the browser.
func (a *app) authorized(r *http.Request) bool {
	got := ""
	if bearer, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok {
		got = bearer
	} else if c, err := r.Cookie(sessionCookie); err == nil {
		got = c.Value
	}
	return got != "" && subtle.ConstantTimeCompare([]byte(got), []byte(a.token)) == 1
}

func unauthorized(w http.ResponseWriter) {
	w.Header().Set("WWW-Authenticate", `Bearer realm="ai-typewriter"`)
	http.Error(w, "Please sign in: this app only answers its own users.", http.StatusUnauthorized)
}

// startChat answers with the channel instead of a body; Caddy turns that
// answer into the stream. The answer is published in the background.
func (a *app) startChat(w http.ResponseWriter, r *http.Request) {
	if !a.authorized(r) {
		unauthorized(w)
		return
	}
	var req struct {
		Question string `json:"question"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4096)).Decode(&req); err != nil {
		http.Error(w, "expected JSON like {\"question\": \"...\"}", http.StatusBadRequest)
		return
	}
	question := cleanQuestion(req.Question)
	if question == "" {
		http.Error(w, "ask a question", http.StatusBadRequest)
		return
	}
	id := newChatID()
	streamHeaders(w, id)
	w.WriteHeader(http.StatusOK)

	a.answers.Add(1)
	go func() {
		defer a.answers.Done()
		a.publishAnswer("chat:"+id, answerFor(question))
	}()
}

// followChat lets a client that lost the stream reach the same channel
// again. Caddy resumes after the client's Last-Event-ID, or answers 204 once
// the answer is finished.
func (a *app) followChat(w http.ResponseWriter, r *http.Request) {
	if !a.authorized(r) {
		unauthorized(w)
		return
	}
	id := r.PathValue("id")
	if !validChatID(id) {
		http.NotFound(w, r)
		return
	}
	streamHeaders(w, id)
	w.WriteHeader(http.StatusOK)
}

// streamHeaders name the channel for Caddy. Last-Event-Id 0 asks for the
// channel's history from its start, so chunks published before Caddy
// attached the stream are replayed rather than lost; a reconnecting
// client's own Last-Event-ID header takes precedence.
func streamHeaders(w http.ResponseWriter, id string) {
	w.Header().Set("X-Sse-Channel", "chat:"+id)
	w.Header().Set("X-Sse-Last-Event-Id", "0")
}

// newChatID is unguessable: the channel name is all that separates one
// user's answer from another's.
func newChatID() string {
	var b [12]byte
	_, _ = crand.Read(b[:]) // never fails (crypto/rand)
	return hex.EncodeToString(b[:])
}

func validChatID(id string) bool {
	if len(id) != 24 {
		return false
	}
	_, err := hex.DecodeString(id)
	return err == nil && strings.ToLower(id) == id
}

// cleanQuestion trims the question, drops control characters and bounds its
// length, counting characters, not bytes.
func cleanQuestion(q string) string {
	q = strings.Map(func(r rune) rune {
		if r == '\n' || r == '\t' {
			return ' '
		}
		if unicode.IsControl(r) || r == unicode.ReplacementChar {
			return -1
		}
		return r
	}, q)
	q = strings.TrimSpace(q)
	if r := []rune(q); len(r) > maxQuestion {
		q = string(r[:maxQuestion]) + "…"
	}
	return q
}

// answers are what the "model" knows; answerFor picks one by the question so
// that the same question always gets the same answer.
var answers = []string{
	"Caddy is holding this connection, not the app. The app checked your session, " +
		"picked a fresh Redis channel, answered with a header naming it, and went back " +
		"to work. Every few characters it publishes to Redis, and Caddy writes them to " +
		"you as Server-Sent Events.",
	"Nothing in the app holds your connection: it answered your POST at once with an " +
		"X-Sse-Channel header. Caddy turned that answer into an event stream, and the " +
		"words you are reading come from Redis, published a few characters at a time.",
	"If this connection drops, the page asks again with the last event id it saw and " +
		"Caddy replays what it missed from the Redis history. Once the app publishes the " +
		"closing event, a reconnect gets 204 and the page stops.",
}

// answerFor is the canned answer to question.
func answerFor(question string) string {
	h := fnv.New32a()
	_, _ = h.Write([]byte(question))
	return "You asked: “" + question + "”\n\n" + answers[h.Sum32()%uint32(len(answers))]
}

// envelope is the JSON payload the sse directive's `format envelope` reads.
type envelope struct {
	Event string `json:"event"`
	Data  string `json:"data"`
	Close bool   `json:"close,omitempty"`
}

// publishAnswer types text onto channel in chunks of 1 to 3 characters, then
// closes the stream. If the app stops meanwhile it closes the stream with an
// error event, so that no browser waits for an answer that will not come.
func (a *app) publishAnswer(channel, text string) {
	rest := []rune(text)
	for len(rest) > 0 {
		n := min(1+rand.IntN(3), len(rest))
		if err := a.publish(a.ctx, channel, envelope{Event: "chunk", Data: string(rest[:n])}); err != nil {
			a.abandon(channel, err)
			return
		}
		rest = rest[n:]
		if err := sleep(a.ctx, a.delay()); err != nil {
			a.abandon(channel, err)
			return
		}
	}
	if err := a.publish(a.ctx, channel, envelope{Event: "done", Close: true}); err != nil {
		a.abandon(channel, err)
	}
}

// abandon tells the client the answer stopped, on a fresh context: a.ctx
// may be what stopped it.
func (a *app) abandon(channel string, why error) {
	a.log.Printf("answer on %s abandoned: %v", channel, why)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	msg := envelope{Event: "error", Data: "The answer was interrupted. Please ask again.", Close: true}
	if err := a.publish(ctx, channel, msg); err != nil {
		a.log.Printf("cannot close %s: %v", channel, err)
	}
}

// publish sends one resumable event: FCALL sse_publish 1 <channel> <payload>.
func (a *app) publish(ctx context.Context, channel string, ev envelope) error {
	payload, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	for try := 1; ; try++ {
		callCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err = a.rdb.FCall(callCtx, "sse_publish", []string{channel}, payload).Err()
		cancel()
		if err == nil || try == publishTries || ctx.Err() != nil {
			return err
		}
		if serr := sleep(ctx, time.Duration(try)*200*time.Millisecond); serr != nil {
			return err
		}
	}
}

func (a *app) delay() time.Duration {
	return a.minDelay + rand.N(a.maxDelay-a.minDelay+1)
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

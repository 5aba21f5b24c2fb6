package caddysse_test

// End-to-end tests of what a client or a publisher must never be able to
// do with the bytes it controls (SPEC.md, "Security", "Resume",
// "Backend-driven streams"): turn a placeholder's value into more channels,
// reach a reserved channel, forge or move a resume point, end another
// channel's streams, or outlive its token. Real redis-server, real Caddy.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

var trustCaddyfile = globalOptions + `
http://127.0.0.1:{HTTP} {
	@users path /room /r/* /h
	basic_auth @users {
		alice {ALICE_HASH}
		bob {BOB_HASH}
	}
	sse /room {
		redis {REDIS}
		channel room:{query.room} user:{http.auth.user.id}
		allow (room|user):[a-z0-9]+
	}
	sse /r/* {
		redis {REDIS}
		channel room:{path.1} user:{http.auth.user.id}
		allow (room|user):[a-z0-9]+
	}
	sse /h {
		redis {REDIS}
		channel room:{http.request.header.X-Room} user:{http.auth.user.id}
		allow (room|user):[a-z0-9]+
	}
	sse /q {
		redis {REDIS}
		channel room:{query.room} news
	}

	sse /list {
		redis {REDIS}
		channel {http.request.header.X-Sse-Channel}
		allow (a|b):[a-z0-9]+
	}
	sse /any {
		redis {REDIS}
		channel {query.c}
	}

	sse_publish /publish/* {
		redis {REDIS}
		channel chat:{path.1}
	}
	sse /chat/* {
		redis {REDIS}
		channel chat:{path.1}
	}

	sse /hist/* {
		redis {REDIS}
		channel h:{path.1}
		format envelope
		history 100
	}
	sse /nohist/* {
		redis {REDIS}
		channel n:{path.1}
		format envelope
	}
	sse /f/* {
		redis {REDIS}
		channel f:{path.1}
		history 100
	}

	sse /close {
		redis {REDIS}
		channel {query.c}
		format envelope
	}

	sse /jwt {
		redis {REDIS}
		channel {query.c}
		jwt {
			key {env.SSE_JWT_SECRET}
		}
	}

	respond "no such route" 404
}
`

// trustEnv is a Redis and a Caddy running trustCaddyfile; the embedded
// secEnv brings open, refused, publish and assertNothingSubscribed.
type trustEnv struct {
	*secEnv
	client *redis.Client
}

func startTrust(t *testing.T) *trustEnv {
	t.Helper()
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	in := caddyproc.Start(t, trustCaddyfile, caddyproc.Options{
		"{REDIS}":      rs.URL(),
		"{ALICE_HASH}": bcryptHash(t, "alice-pw"),
		"{BOB_HASH}":   bcryptHash(t, "bob-pw"),
	}, "SSE_JWT_SECRET="+jwtSecret)
	return &trustEnv{secEnv: &secEnv{rdb: rs, caddy: in}, client: rs.Client()}
}

// fcall publishes a resumable event (FCALL sse_publish) and returns its id.
func (e *trustEnv) fcall(t *testing.T, channel, payload string) uint64 {
	t.Helper()
	return (&cluster{rdb: e.client}).fcall(t, channel, payload)
}

// get opens a GET stream with header (several values of a name are sent as
// several header lines).
func (e *trustEnv) get(path string, header http.Header) (*sseclient.Stream, error) {
	req, err := http.NewRequest(http.MethodGet, e.caddy.URL()+path, nil)
	if err != nil {
		return nil, err
	}
	for k, v := range header {
		req.Header[k] = v
	}
	return sseclient.Open(context.Background(), nil, req)
}

func (e *trustEnv) subscribed(t *testing.T) []string {
	t.Helper()
	chans, err := e.client.PubSubChannels(context.Background(), "*").Result()
	if err != nil {
		t.Fatal(err)
	}
	return chans
}

// waitNothingSubscribed waits until no channel is subscribed, so that a
// stream a failed case opened and closed does not count against the next.
func (e *trustEnv) waitNothingSubscribed(t *testing.T) {
	t.Helper()
	var chans []string
	ssetest.Wait(t, 5*time.Second, "no channel subscribed", func() bool {
		chans = e.subscribed(t)
		return len(chans) == 0
	}, func() string { return fmt.Sprintf("still subscribed: %q", chans) })
}

// refusal is a stream request that must be refused with status.
type refusal struct {
	name   string
	path   string
	header http.Header
	status int
}

// expectRefused runs each refusal as a subtest: the status, and nothing
// subscribed in Redis.
func (e *trustEnv) expectRefused(t *testing.T, cases []refusal) {
	t.Helper()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e.waitNothingSubscribed(t)
			s, err := e.get(c.path, c.header)
			if err == nil {
				chans := e.subscribed(t)
				s.Close()
				t.Fatalf("GET %q: stream opened (200), want %d; subscribed: %q", c.path, c.status, chans)
			}
			var se *sseclient.StatusError
			if !errors.As(err, &se) {
				t.Fatalf("GET %q: %v", c.path, err)
			}
			if se.Code != c.status {
				t.Errorf("GET %q: %d %q, want %d", c.path, se.Code, se.Body, c.status)
			}
			e.assertNothingSubscribed(t)
		})
	}
}

// asAlice is alice's basic_auth header plus the name/value pairs.
func asAlice(kv ...string) http.Header {
	h := http.Header{"Authorization": {basic("alice", "alice-pw")}}
	for i := 0; i+1 < len(kv); i += 2 {
		h.Add(kv[i], kv[i+1])
	}
	return h
}

// nextWith waits for the event carrying data, skipping any other.
func nextWith(s *sseclient.Stream, data string) (sseclient.Event, error) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		ev, err := s.Next(time.Until(deadline))
		if err != nil || ev.Data == data {
			return ev, err
		}
	}
}

// rawEvent is the block of the raw stream (lines up to a blank line) that
// holds the line "data: <data>".
func rawEvent(raw, data string) string {
	for _, block := range strings.Split(raw, "\n\n") {
		for _, line := range strings.Split(block, "\n") {
			if line == "data: "+data {
				return block
			}
		}
	}
	return ""
}

func hasIDLine(block string) bool {
	for _, line := range strings.Split(block, "\n") {
		if line == "id" || strings.HasPrefix(line, "id:") {
			return true
		}
	}
	return false
}

// ended waits up to d for the server to end s.
func ended(s *sseclient.Stream, d time.Duration) bool {
	select {
	case <-s.Done():
		return true
	case <-time.After(d):
		return false
	}
}

// waitStatus polls GET path until it answers status (a publisher's close is
// recorded in the background).
func (e *trustEnv) waitStatus(t *testing.T, path string, status int) {
	t.Helper()
	var got int
	ssetest.Wait(t, 5*time.Second, fmt.Sprintf("GET %s to answer %d", path, status), func() bool {
		got = ssetest.Status(t, e.caddy.URL()+path)
		return got == status
	}, func() string { return fmt.Sprint("it answers ", got) })
}

// A template with text around a placeholder names exactly one channel: a
// value that is empty, blank, or holds a comma or a control character is
// refused (400) with nothing subscribed, from the query, the path or a
// header.
func TestTrustPlaceholderValueIsData(t *testing.T) {
	e := startTrust(t)
	e.expectRefused(t, []refusal{
		{"query comma", "/room?room=x,user:bob", asAlice(), 400},
		{"query encoded comma", "/room?room=x%2Cuser:bob", asAlice(), 400},
		{"query newline", "/room?room=%0Auser:bob", asAlice(), 400},
		{"query repeated", "/room?room=x&room=user:bob", asAlice(), 400},
		{"query empty", "/room?room=", asAlice(), 400},
		{"query missing", "/room", asAlice(), 400},
		{"query blank", "/room?room=%20%20", asAlice(), 400},

		{"no allow: empty", "/q?room=", nil, 400},
		{"no allow: blank", "/q?room=%20", nil, 400},
		{"no allow: comma", "/q?room=a,b", nil, 400},
		{"no allow: LF", "/q?room=a%0Ab", nil, 400},
		{"no allow: CR", "/q?room=a%0Db", nil, 400},
		{"no allow: NUL", "/q?room=a%00b", nil, 400},
		{"no allow: RS", "/q?room=a%1Eb", nil, 400},
		{"no allow: tab", "/q?room=a%09b", nil, 400},

		{"path encoded comma", "/r/x%2Cuser:bob", asAlice(), 400},
		{"path comma", "/r/x,user:bob", asAlice(), 400},
		{"path newline", "/r/%0Auser:bob", asAlice(), 400},
		{"path empty", "/r/", asAlice(), 400},

		{"header comma", "/h", asAlice("X-Room", "x,user:bob"), 400},
		{"header repeated", "/h", asAlice("X-Room", "x", "X-Room", "user:bob"), 400},
		{"header tab", "/h", asAlice("X-Room", "x\tuser:bob"), 400},
		{"header missing", "/h", asAlice(), 400},
	})

	// The same routes with a plain value: alice gets her room and her own
	// channel, and never bob's (published first, so it would come first).
	alice := []string{"Authorization", basic("alice", "alice-pw")}
	room := e.open(t, "/room?room=lobby", alice...)
	path := e.open(t, "/r/lobby", alice...)
	header := e.open(t, "/h", alice[0], alice[1], "X-Room", "lobby")
	q := e.open(t, "/q?room=lobby")
	e.publish(t, "user:bob", "to bob")
	e.publish(t, "user:alice", "to alice")
	e.publish(t, "news", "news")
	e.publish(t, "room:lobby", "to the lobby")
	for _, s := range []*sseclient.Stream{room, path, header} {
		ssetest.Expect(t, s, "to alice", "to the lobby")
	}
	ssetest.Expect(t, q, "news", "to the lobby")
}

// A template that is one placeholder and nothing else is a comma-separated
// list: every item subscribed, each checked by allow; an empty item or one
// with a control character is refused (400). Channels starting with "sse:"
// are the module's: 403.
func TestTrustSinglePlaceholderIsList(t *testing.T) {
	e := startTrust(t)
	list := func(v string) http.Header { return http.Header{"X-Sse-Channel": {v}} }
	e.expectRefused(t, []refusal{
		{"item outside allow", "/list", list("a:1,c:3"), 403},
		{"empty item", "/list", list("a:1,,b:2"), 400},
		{"tab in an item", "/list", list("a:1,b:2\tx"), 400},
		{"empty item in query", "/any?c=a:1,,b:2", nil, 400},
		{"LF in an item", "/any?c=a:1,b:%0A2", nil, 400},
		{"CR in an item", "/any?c=a:1,b:%0D2", nil, 400},
		{"NUL in an item", "/any?c=a:1,b:%002", nil, 400},
		{"RS in an item", "/any?c=a:1,%1Eb:2", nil, 400},
		{"reserved channel", "/any?c=sse:r:room", nil, 403},
		{"reserved channel in a list", "/any?c=a:1,sse:h:a:1", nil, 403},
	})

	header := e.open(t, "/list", "X-Sse-Channel", "a:1,b:2")
	query := e.open(t, "/any?c=a:1,b:2")
	for _, c := range []string{"c:3", "a:1", "b:2"} {
		e.publish(t, c, "to "+c)
	}
	for _, s := range []*sseclient.Stream{header, query} {
		ssetest.Expect(t, s, "to a:1", "to b:2")
	}
}

// sse_publish follows the same rule, with exactly one channel per request.
func TestTrustPublishOneChannel(t *testing.T) {
	e := startTrust(t)
	ctx := context.Background()
	// A pattern subscription sees every publish on chat*, whatever channel
	// a refused request might have published to.
	watch := e.client.PSubscribe(ctx, "chat*")
	defer watch.Close()
	if _, err := watch.Receive(ctx); err != nil {
		t.Fatal(err)
	}
	post := func(path, body string) (int, string) {
		code, _, answer := ssetest.Do(t, http.MethodPost, e.caddy.URL()+path, body, "Content-Type", "text/plain")
		return code, answer
	}
	for _, c := range []struct{ name, path string }{
		{"empty", "/publish/"},
		{"blank", "/publish/%20"},
		{"comma", "/publish/a,b"},
		{"encoded comma", "/publish/a%2Cb"},
		{"LF", "/publish/a%0Ab"},
		{"NUL", "/publish/a%00b"},
		{"RS", "/publish/a%1Eb"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if status, body := post(c.path, "refused"); status != http.StatusBadRequest {
				t.Errorf("POST %q: %d %q, want 400", c.path, status, body)
			}
		})
	}

	s := e.open(t, "/chat/ok")
	if status, body := post("/publish/ok", "hello ok"); status != http.StatusOK {
		t.Fatalf("POST /publish/ok: %d %q", status, body)
	}
	ssetest.Expect(t, s, "hello ok")
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	msg, err := watch.ReceiveMessage(rctx)
	if err != nil {
		t.Fatal(err)
	}
	if msg.Channel != "chat:ok" || msg.Payload != "hello ok" {
		t.Fatalf("first publish seen on chat*: %q on %q, want \"hello ok\" on chat:ok (refused requests publish nothing)", msg.Payload, msg.Channel)
	}
}

// On a stream with history, id: is always the module's resume id: an
// envelope's id from a plain PUBLISH is not sent, and does not move the
// client's resume point. Without history the envelope id is sent as is.
func TestTrustHistoryIDIsResumeID(t *testing.T) {
	e := startTrust(t)
	waitFunctions(t, e.client)
	s := e.open(t, "/hist/one")
	id1 := e.fcall(t, "h:one", `{"data":"r1"}`)
	if ev := ssetest.Expect(t, s, "r1")[0]; ev.ID != fmt.Sprint(id1) {
		t.Fatalf("resumable event has id %q, want %d", ev.ID, id1)
	}
	e.publish(t, "h:one", `{"id":"999999","data":"plain"}`)
	ssetest.Expect(t, s, "plain")
	if block := rawEvent(s.Raw(), "plain"); hasIDLine(block) {
		t.Errorf("plain PUBLISH on a history stream sent an id: %q", block)
	}
	last := s.LastEventID()
	if last != fmt.Sprint(id1) {
		t.Errorf("Last-Event-ID after the plain event = %q, want %d (the last resumable event's)", last, id1)
	}
	s.Close()

	id2 := e.fcall(t, "h:one", `{"data":"r2"}`)
	id3 := e.fcall(t, "h:one", `{"data":"r3"}`)
	r := e.open(t, "/hist/one", "Last-Event-ID", last)
	evs := ssetest.Expect(t, r, "r2", "r3")
	if evs[0].ID != fmt.Sprint(id2) || evs[1].ID != fmt.Sprint(id3) {
		t.Fatalf("replayed ids %q %q, want %d %d", evs[0].ID, evs[1].ID, id2, id3)
	}
	e.fcall(t, "h:one", `{"data":"r4"}`)
	ssetest.Expect(t, r, "r4")

	n := e.open(t, "/nohist/one")
	e.publish(t, "n:one", `{"id":"999999","data":"y"}`)
	ssetest.Expect(t, n, "y")
	if block := rawEvent(n.Raw(), "y"); !strings.Contains(block+"\n", "\nid: 999999\n") {
		t.Fatalf("without history the envelope id is not sent: %q", block)
	}
}

// A plain PUBLISH shaped like sse_publish's frame never reaches a client as
// an id, never suppresses a resumable event on any channel, and is counted.
func TestTrustForgedFrames(t *testing.T) {
	for _, c := range []struct {
		name    string
		channel string // where the forged frame is published
		id      func(current uint64) uint64
	}{
		{"max id", "f:ch", func(uint64) uint64 { return math.MaxUint64 }},
		{"current id + 1000", "f:ch", func(cur uint64) uint64 { return cur + 1000 }},
		{"another channel", "f:other", func(cur uint64) uint64 { return cur + 1_000_000_000 }},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := startTrust(t)
			waitFunctions(t, e.client)
			streams := map[string]*sseclient.Stream{"f:ch": e.open(t, "/f/ch"), "f:other": e.open(t, "/f/other")}
			current := e.fcall(t, "f:ch", "before")
			if _, err := nextWith(streams["f:ch"], "before"); err != nil {
				t.Fatalf("resumable event before the forgery: %v", err)
			}
			forged := strconv.FormatUint(c.id(current), 10)
			e.publish(t, c.channel, "\x1esse:"+forged+"\x1ex")

			ids := map[string]uint64{}
			for ch := range streams {
				ids[ch] = e.fcall(t, ch, "after "+ch)
			}
			for ch, s := range streams {
				ev, err := nextWith(s, "after "+ch)
				if err != nil {
					t.Errorf("%s: the resumable event published after the forgery did not arrive: %v (raw %q)", ch, err, s.Raw())
				} else if ev.ID != fmt.Sprint(ids[ch]) {
					t.Errorf("%s: resumable event has id %q, want %d", ch, ev.ID, ids[ch])
				}
				if strings.Contains(s.Raw(), "\nid: "+forged+"\n") {
					t.Errorf("%s: the forged id reached the client: %q", ch, s.Raw())
				}
			}
			waitMetrics(t, e.caddy, `caddy_sse_messages_rejected_total{reason="forged_frame"} 1`)
		})
	}
}

// A publisher's close ends that channel only: a stream on other channels
// goes on, and 204 answers only a request whose every channel is closed.
func TestTrustCloseEndsOneChannel(t *testing.T) {
	e := startTrust(t)
	const bye = `{"event":"bye","data":"x","close":true}`

	t.Run("open stream goes on", func(t *testing.T) {
		s := e.open(t, "/close?c=t:a,t:b")
		e.publish(t, "t:a", bye)
		if ev := ssetest.Next(t, s); ev.Event != "bye" || ev.Data != "x" {
			t.Fatalf("got %+v, want the bye event", ev)
		}
		e.publish(t, "t:b", `{"data":"b1"}`)
		ssetest.Expect(t, s, "b1")
		e.publish(t, "t:a", `{"data":"a after close"}`)
		e.publish(t, "t:b", `{"data":"b2"}`)
		ssetest.Expect(t, s, "b2")
	})

	t.Run("reconnect", func(t *testing.T) {
		first := e.open(t, "/close?c=u:a,u:b")
		e.publish(t, "u:a", bye)
		if ev := ssetest.Next(t, first); ev.Event != "bye" {
			t.Fatalf("got %+v, want the bye event", ev)
		}
		e.waitStatus(t, "/close?c=u:a", http.StatusNoContent)

		s := e.open(t, "/close?c=u:a,u:b")
		e.publish(t, "u:a", `{"data":"a after close"}`)
		e.publish(t, "u:b", `{"data":"b1"}`)
		ssetest.Expect(t, s, "b1")
		e.publish(t, "u:b", bye)
		for _, st := range []*sseclient.Stream{first, s} {
			if !ended(st, 5*time.Second) {
				t.Fatalf("a stream whose channels are all closed is still open: %q", st.Raw())
			}
		}
		e.waitStatus(t, "/close?c=u:a,u:b", http.StatusNoContent)
	})
}

// A stream admitted by a JWT ends when the token expires, and not before.
func TestTrustTokenExpiryEndsStream(t *testing.T) {
	e := startTrust(t)
	exp := time.Unix(time.Now().Add(3*time.Second).Unix(), 0)
	short := e.open(t, "/jwt?c=j:short", "Authorization", "Bearer "+hs(t, []string{"j:short"}, "exp", exp.Unix()))
	long := e.open(t, "/jwt?c=j:long", "Authorization", "Bearer "+hs(t, []string{"j:long"}))
	if !ended(short, time.Until(exp.Add(2*time.Second))) {
		t.Fatalf("the stream of a token that expired at %s is still open at %s", exp.Format(time.TimeOnly), time.Now().Format("15:04:05.000"))
	}
	if at := time.Now(); at.Before(exp.Add(-time.Second)) {
		t.Fatalf("the stream ended at %s, more than 1s before its token expired at %s", at.Format("15:04:05.000"), exp.Format(time.TimeOnly))
	}
	if err := short.Err(); err != io.EOF {
		t.Fatalf("the expired stream ended with %v, want a clean end", err)
	}
	select {
	case <-long.Done():
		t.Fatalf("the stream of a token valid for an hour ended: %v", long.Err())
	default:
	}
	e.publish(t, "j:long", "still here")
	ssetest.Expect(t, long, "still here")
}

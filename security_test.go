package caddysse_test

// End-to-end tests of what keeps one user out of another's channels and
// keeps the server standing under abuse: JWT, basic_auth and forward_auth
// identities, max_connections_per, and hostile payloads. Real redis-server,
// real Caddy.

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/golang-jwt/jwt/v5"
	"golang.org/x/crypto/bcrypt"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

// jwtSecret reaches Caddy through the environment, as {env.SSE_JWT_SECRET}.
const jwtSecret = "test-secret-that-is-long-enough-0123456789"

var securityCaddyfile = globalOptions + `
http://127.0.0.1:{HTTP} {
	sse /jwt/hs {
		redis {REDIS}
		channel {query.c}
		jwt {
			key {env.SSE_JWT_SECRET}
		}
	}
	sse /jwt/sub {
		redis {REDIS}
		channel user:{sse.jwt.sub}
		jwt {
			key {env.SSE_JWT_SECRET}
			from query token
		}
	}
	sse /jwt/rs {
		redis {REDIS}
		channel {query.c}
		jwt {
			key {RSA_PEM}
			alg RS256
		}
	}
	sse /jwt/es {
		redis {REDIS}
		channel {query.c}
		jwt {
			key {EC_PEM}
			alg ES256
			from cookie sse_token
		}
	}

	basic_auth /basic/* {
		alice {ALICE_HASH}
		bob {BOB_HASH}
	}
	sse /basic/events {
		redis {REDIS}
		channel user:{http.auth.user.id}
	}
	sse /basic/reject {
		redis {REDIS}
		channel per:{http.auth.user.id}
		max_connections_per {http.auth.user.id} 2
	}
	sse /basic/evict {
		redis {REDIS}
		channel per:{http.auth.user.id}
		max_connections_per {http.auth.user.id} 2 evict_oldest
	}

	forward_auth /fa/* {FORWARD_AUTH} {
		uri /auth
		copy_headers X-Sse-Channels
	}
	sse /fa/events {
		redis {REDIS}
		channel {header.X-Sse-Channels}
		allow (user|room):[a-z]+
	}

	respond "app" 200
}
`

type secEnv struct {
	rdb   *redistest.Server
	caddy *caddyproc.Instance
	rsa   *rsa.PrivateKey
	ec    *ecdsa.PrivateKey
}

// startSecurity starts Redis, the forward_auth upstream and Caddy, with
// fresh RSA and ECDSA keys whose public halves are PEM files.
func startSecurity(t *testing.T) *secEnv {
	t.Helper()
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	// The existing app's auth endpoint: it knows the user by its token and
	// answers with the user's channels.
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.Header.Get("Authorization") {
		case "Bearer alice-session":
			w.Header().Set("X-Sse-Channels", "user:alice, room:lobby")
		case "Bearer mallory-session":
			w.Header().Set("X-Sse-Channels", "user:mallory,admin:all")
		default:
			http.Error(w, "who are you?", http.StatusUnauthorized)
			return
		}
		w.WriteHeader(http.StatusOK)
	}))
	t.Cleanup(app.Close)

	vars := caddyproc.Options{
		"{REDIS}":        rs.URL(),
		"{RSA_PEM}":      writePublicPEM(t, &rsaKey.PublicKey),
		"{EC_PEM}":       writePublicPEM(t, &ecKey.PublicKey),
		"{ALICE_HASH}":   bcryptHash(t, "alice-pw"),
		"{BOB_HASH}":     bcryptHash(t, "bob-pw"),
		"{FORWARD_AUTH}": strings.TrimPrefix(app.URL, "http://"),
	}
	in := caddyproc.Start(t, securityCaddyfile, vars, "SSE_JWT_SECRET="+jwtSecret)
	return &secEnv{rdb: rs, caddy: in, rsa: rsaKey, ec: ecKey}
}

func writePublicPEM(t *testing.T, pub any) string {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "public.pem")
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func bcryptHash(t *testing.T, pw string) string {
	t.Helper()
	h, err := bcrypt.GenerateFromPassword([]byte(pw), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	return string(h)
}

// token signs claims (an hour of validity and the given channels unless
// overridden) with method and key.
func token(t *testing.T, method jwt.SigningMethod, key any, channels any, extra ...any) string {
	t.Helper()
	claims := jwt.MapClaims{"sub": "42", "exp": time.Now().Add(time.Hour).Unix(), "channels": channels}
	for i := 0; i+1 < len(extra); i += 2 {
		claims[extra[i].(string)] = extra[i+1]
	}
	s, err := jwt.NewWithClaims(method, claims).SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func hs(t *testing.T, channels any, extra ...any) string {
	return token(t, jwt.SigningMethodHS256, []byte(jwtSecret), channels, extra...)
}

func (e *secEnv) open(t *testing.T, path string, header ...string) *sseclient.Stream {
	t.Helper()
	return ssetest.Open(t, e.caddy.URL()+path, header...)
}

// refused opens path and expects it refused with status; it returns the
// refusal for more checks.
func (e *secEnv) refused(t *testing.T, path string, status int, header ...string) *sseclient.StatusError {
	t.Helper()
	return ssetest.Refused(t, e.caddy.URL()+path, status, header...)
}

func (e *secEnv) publish(t *testing.T, channel, payload string) {
	t.Helper()
	ssetest.Publish(t, e.rdb.Client(), channel, payload)
}

// expectOnly publishes one event to every channel in order and expects s to
// receive exactly the ones in want (by channel name), in order.
func (e *secEnv) expectOnly(t *testing.T, s *sseclient.Stream, publish []string, want ...string) {
	t.Helper()
	for _, c := range publish {
		e.publish(t, c, "to "+c)
	}
	for _, c := range want {
		if ev := ssetest.Next(t, s); ev.Data != "to "+c {
			t.Fatalf("got %q, want %q", ev.Data, "to "+c)
		}
	}
	ssetest.NoEvent(t, s, 200*time.Millisecond)
}

// assertNothingSubscribed checks that refused requests left no channel
// subscribed in Redis.
func (e *secEnv) assertNothingSubscribed(t *testing.T) {
	t.Helper()
	chans, err := e.rdb.Client().PubSubChannels(context.Background(), "*").Result()
	if err != nil || len(chans) != 0 {
		t.Fatalf("channels subscribed after refusals: %v %v", chans, err)
	}
}

func TestSecurityJWTSources(t *testing.T) {
	e := startSecurity(t)
	tok := hs(t, []string{"user:42"})
	header := e.open(t, "/jwt/hs?c=user:42", "Authorization", "Bearer "+tok)
	// EventSource cannot set headers: the query parameter and the cookie.
	query := e.open(t, "/jwt/hs?c=user:42&access_token="+tok)
	cookie := e.open(t, "/jwt/hs?c=user:42", "Cookie", "access_token="+tok)
	e.publish(t, "user:42", "hello")
	for _, s := range []*sseclient.Stream{header, query, cookie} {
		ssetest.Expect(t, s, "hello")
	}
	// The subject names the channel; the token is in the `token` query
	// parameter, the only place this route looks.
	sub := e.open(t, "/jwt/sub?token="+tok)
	e.expectOnly(t, sub, []string{"user:41", "user:42", "user:43"}, "user:42")
	e.refused(t, "/jwt/sub", http.StatusUnauthorized, "Authorization", "Bearer "+tok)
}

func TestSecurityJWTPublicKeys(t *testing.T) {
	e := startSecurity(t)
	rs := token(t, jwt.SigningMethodRS256, e.rsa, "room:*")
	es := token(t, jwt.SigningMethodES256, e.ec, []string{"room:lobby"})
	a := e.open(t, "/jwt/rs?c=room:lobby", "Authorization", "Bearer "+rs)
	b := e.open(t, "/jwt/es?c=room:lobby", "Cookie", "sse_token="+es)
	e.publish(t, "room:lobby", "hi")
	for _, s := range []*sseclient.Stream{a, b} {
		ssetest.Expect(t, s, "hi")
	}
	// A key of the other kind, or another key of the right kind, is refused.
	otherEC, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	e.refused(t, "/jwt/rs?c=room:lobby", http.StatusUnauthorized, "Authorization", "Bearer "+es)
	e.refused(t, "/jwt/es?c=room:lobby", http.StatusUnauthorized, "Cookie", "sse_token="+rs)
	e.refused(t, "/jwt/es?c=room:lobby", http.StatusUnauthorized, "Cookie", "sse_token="+token(t, jwt.SigningMethodES256, otherEC, "room:*"))
	// The RS256 public key used as an HS256 secret: the classic key
	// confusion.
	pub, _ := x509.MarshalPKIXPublicKey(&e.rsa.PublicKey)
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub})
	e.refused(t, "/jwt/rs?c=room:lobby", http.StatusUnauthorized, "Authorization", "Bearer "+token(t, jwt.SigningMethodHS256, pubPEM, "room:*"))
}

func TestSecurityJWTRefusals(t *testing.T) {
	e := startSecurity(t)
	path := "/jwt/hs?c=user:42"
	bearer := func(tok string) []string { return []string{"Authorization", "Bearer " + tok} }

	se := e.refused(t, path, http.StatusUnauthorized)
	if got := se.Header.Get("WWW-Authenticate"); !strings.HasPrefix(got, "Bearer") {
		t.Fatalf("401 with WWW-Authenticate %q", got)
	}
	se = e.refused(t, path, http.StatusUnauthorized, bearer(hs(t, "user:42", "exp", time.Now().Add(-time.Hour).Unix()))...)
	if !strings.Contains(se.Body, "expired") || !strings.Contains(se.Header.Get("WWW-Authenticate"), "invalid_token") {
		t.Fatalf("expired token: %q, WWW-Authenticate %q", se.Body, se.Header.Get("WWW-Authenticate"))
	}
	wrongKey := token(t, jwt.SigningMethodHS256, []byte("another-secret-of-at-least-32-bytes!!"), "user:42")
	e.refused(t, path, http.StatusUnauthorized, bearer(wrongKey)...)
	// A valid token with its signature altered.
	good := hs(t, "user:42")
	e.refused(t, path, http.StatusUnauthorized, bearer(good[:len(good)-2]+flip(good[len(good)-2:]))...)
	none := token(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, "user:42")
	e.refused(t, path, http.StatusUnauthorized, bearer(none)...)
	// The same secret under another HMAC algorithm is not HS256.
	e.refused(t, path, http.StatusUnauthorized, bearer(token(t, jwt.SigningMethodHS512, []byte(jwtSecret), "user:42"))...)
	e.refused(t, path, http.StatusUnauthorized, bearer(hs(t, "user:42", "nbf", time.Now().Add(time.Hour).Unix()))...)

	// Valid, but not for this channel: 403.
	se = e.refused(t, path, http.StatusForbidden, bearer(hs(t, []string{"user:43", "user:4*2x"}))...)
	if !strings.Contains(se.Body, "grant") {
		t.Fatalf("403 body %q", se.Body)
	}
	e.refused(t, "/jwt/hs?c=user:42,user:43", http.StatusForbidden, bearer(hs(t, "user:42"))...)
	e.refused(t, path, http.StatusForbidden, bearer(hs(t, nil))...)
	e.assertNothingSubscribed(t)

	// A wildcard grants what it matches, and only that.
	wild := hs(t, []string{"user:4*"})
	s := e.open(t, "/jwt/hs?c=user:42,user:47", bearer(wild)...)
	e.refused(t, "/jwt/hs?c=user:42,admin:1", http.StatusForbidden, bearer(wild)...)
	e.expectOnly(t, s, []string{"user:42", "user:5", "user:47"}, "user:42", "user:47")
}

// flip changes a base64url signature's characters so that it decodes to
// other bytes.
func flip(s string) string {
	b := []byte(s)
	for i := range b {
		if b[i] == 'A' {
			b[i] = 'B'
		} else {
			b[i] = 'A'
		}
	}
	return string(b)
}

func TestSecurityBasicAuthOwnChannel(t *testing.T) {
	e := startSecurity(t)
	alice := e.open(t, "/basic/events", "Authorization", basic("alice", "alice-pw"))
	bob := e.open(t, "/basic/events", "Authorization", basic("bob", "bob-pw"))
	e.publish(t, "user:bob", "for bob")
	e.publish(t, "user:alice", "for alice")
	ssetest.Expect(t, alice, "for alice")
	ssetest.Expect(t, bob, "for bob")
	ssetest.NoEvent(t, alice, 200*time.Millisecond)
	e.refused(t, "/basic/events", http.StatusUnauthorized)
	e.refused(t, "/basic/events", http.StatusUnauthorized, "Authorization", basic("alice", "bob-pw"))
}

func basic(user, pw string) string {
	r, _ := http.NewRequest(http.MethodGet, "/", nil)
	r.SetBasicAuth(user, pw)
	return r.Header.Get("Authorization")
}

func TestSecurityForwardAuthChannels(t *testing.T) {
	e := startSecurity(t)
	// The client's own X-Sse-Channels is dropped: only the app's answer
	// counts.
	alice := e.open(t, "/fa/events", "Authorization", "Bearer alice-session", "X-Sse-Channels", "user:bob")
	e.expectOnly(t, alice, []string{"user:bob", "user:alice", "room:lobby", "room:other"}, "user:alice", "room:lobby")
	e.refused(t, "/fa/events", http.StatusUnauthorized, "X-Sse-Channels", "user:bob")
	// A channel from the app that fails `allow` refuses the stream.
	e.refused(t, "/fa/events", http.StatusForbidden, "Authorization", "Bearer mallory-session")
}

func TestSecurityLimitPerReject(t *testing.T) {
	e := startSecurity(t)
	alice := []string{"Authorization", basic("alice", "alice-pw")}
	s1 := e.open(t, "/basic/reject", alice...)
	e.open(t, "/basic/reject", alice...)
	se := e.refused(t, "/basic/reject", http.StatusTooManyRequests, alice...)
	if se.Header.Get("Retry-After") == "" {
		t.Fatal("429 without Retry-After")
	}
	// Another user is counted apart.
	e.open(t, "/basic/reject", "Authorization", basic("bob", "bob-pw"))
	// Once a stream ends its place is free again, and only one.
	s1.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		s, err := sseclient.Get(context.Background(), e.caddy.URL()+"/basic/reject", alice...)
		if err == nil {
			t.Cleanup(s.Close)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no place freed after a stream ended: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	e.refused(t, "/basic/reject", http.StatusTooManyRequests, alice...)
}

func TestSecurityLimitPerEvictOldest(t *testing.T) {
	e := startSecurity(t)
	alice := []string{"Authorization", basic("alice", "alice-pw")}
	s1 := e.open(t, "/basic/evict", alice...)
	s2 := e.open(t, "/basic/evict", alice...)
	bob := e.open(t, "/basic/evict", "Authorization", basic("bob", "bob-pw"))
	s3 := e.open(t, "/basic/evict", alice...)

	// The oldest is told why, then ends.
	ev := ssetest.Next(t, s1)
	if ev.Event != "sse-evicted" || ev.ID != "" {
		t.Fatalf("oldest stream got %+v, want an sse-evicted event", ev)
	}
	select {
	case <-s1.Done():
		if err := s1.Err(); !errors.Is(err, io.EOF) {
			t.Fatalf("evicted stream ended with %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the oldest stream was not ended")
	}
	e.publish(t, "per:alice", "after")
	e.publish(t, "per:bob", "bob's")
	for _, s := range []*sseclient.Stream{s2, s3} {
		ssetest.Expect(t, s, "after")
	}
	ssetest.Expect(t, bob, "bob's")
	waitMetrics(t, e.caddy, `caddy_sse_streams_closed_total{reason="evicted"} 1`)
}

// TestSecurityValidateFailures runs `caddy validate` on configs with a bad
// jwt or max_connections_per and expects it to fail naming the option.
func TestSecurityValidateFailures(t *testing.T) {
	bin := caddyproc.Binary(t)
	dir := t.TempDir()
	site := func(opts string) string {
		return "{\n\tadmin off\n\tstorage file_system " + dir + "\n}\n:8080 {\n\tsse news {\n\t\tredis redis://127.0.0.1:1\n" + opts + "\n\t}\n}\n"
	}
	validate := func(cf string) (string, error) {
		path := filepath.Join(dir, "Caddyfile")
		if err := os.WriteFile(path, []byte(cf), 0o600); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(bin, "validate", "--config", path, "--adapter", "caddyfile")
		cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := validate(site("max_connections_per {http.auth.user.id} 3 evict_oldest\njwt {\nkey 0123456789abcdef0123456789abcdef\n}")); err != nil {
		t.Fatalf("a valid config failed: %v\n%s", err, out)
	}
	for _, tt := range []struct{ opts, want string }{
		{"jwt {\nkey {env.CADDY_SSE_TEST_UNSET}\n}", "jwt: key"},
		{"jwt {\nkey " + filepath.Join(dir, "missing.pem") + "\nalg RS256\n}", "jwt: key"},
		{"jwt {\nkey 0123456789abcdef0123456789abcdef\nalg none\n}", "jwt: alg"},
		{"jwt {\nkey short\n}", "jwt: key"},
		{"jwt {\nkey 0123456789abcdef0123456789abcdef\nfrom body\n}", "jwt: from"},
		{"jwt {\nkey 0123456789abcdef0123456789abcdef\nsecret x\n}", "jwt: unrecognized option"},
		{"max_connections_per {http.auth.user.id} 0", "max_connections_per"},
		{"max_connections_per {http.auth.user.id} 3 lru", "max_connections_per"},
		{"max_connections_per {http.auth.user.id}", "max_connections_per"},
	} {
		out, err := validate(site(tt.opts))
		if err == nil {
			t.Errorf("validate succeeded with %q, want an error naming %q", tt.opts, tt.want)
			continue
		}
		if !strings.Contains(out, tt.want) {
			t.Errorf("validate with %q: output does not name %q:\n%s", tt.opts, tt.want, out)
		}
	}
}

var hostileCaddyfile = globalOptions + `
http://127.0.0.1:{HTTP} {
	sse /raw {
		redis {REDIS}
		channel hostile:raw
		buffer 4096
	}
	sse /envelope {
		redis {REDIS}
		channel hostile:env
		format envelope
		buffer 4096
	}
}
`

// text is generated payload text with what a client must read back: data
// is the text as a data field delivers it before line breaks are
// normalised, field as an event or id field delivers it.
type text struct{ raw, data, field string }

func (a text) add(b text) text { return text{a.raw + b.raw, a.data + b.data, a.field + b.field} }

func plain(s string) text { return text{s, s, s} }

const fffd = "\uFFFD"

// hostileTokens are the pieces random payloads are made of. Each invalid
// byte is one that can never start or continue a UTF-8 sequence next to any
// other token, so it is exactly one U+FFFD for a browser's decoder.
var hostileTokens = func() []text {
	var ts []text
	for _, s := range []string{"a", "Z", "0", " ", "  ", ":", "\t", "{", "}", "\"", "\\",
		"data:", "data: ", "id: 7", "event: evil", "retry: 1", ": comment",
		"é", "世", "😀", "\uFEFF", "\u2028", "\u0085"} {
		ts = append(ts, plain(s))
	}
	// Line breaks end a data line for the client (normalised below) and
	// are replaced in a field; NUL is data, but never a field.
	for _, s := range []string{"\n", "\r", "\r\n", "\n\n", "\r\r", "\x00"} {
		ts = append(ts, text{s, s, strings.Repeat(fffd, len(s))})
	}
	for _, b := range []byte{0x80, 0xBF, 0xC0, 0xC1, 0xF5, 0xFE, 0xFF} {
		ts = append(ts, text{string([]byte{b}), fffd, fffd})
	}
	return ts
}()

// hostileFixed are hand-made cases, with invalid sequences whose
// replacement depends on the WHATWG "maximal subpart" rule.
var hostileFixed = []text{
	plain(""),
	plain("x\rid: 9"),
	plain("data: fake\n\nid: 7\nevent: evil\nretry: 1\n\ndata: more"),
	plain("\n"), plain("\r"), plain("\r\n"), plain("\n\r"), plain("\r\r\n\n"),
	plain(" leading space"), plain(":not a comment"), plain("\n\n\n\n"),
	{"a\xe2\x82b", "a" + fffd + "b", "a" + fffd + "b"},
	{"\xf0\x9f\x98", fffd, fffd},
	{"\xed\xa0\x80", fffd + fffd + fffd, fffd + fffd + fffd},
	{"\xc0\xaf", fffd + fffd, fffd + fffd},
	{"\xe0\x80\x80x", fffd + fffd + fffd + "x", fffd + fffd + fffd + "x"},
	{"\xf4\x90\x80\x80", strings.Repeat(fffd, 4), strings.Repeat(fffd, 4)},
	plain("\xef\xbb\xbfBOM"),
	{"nul\x00inside", "nul\x00inside", "nul" + fffd + "inside"},
}

// normalise makes line breaks LF, as a client splitting data lines does.
func normalise(s string) string {
	return strings.ReplaceAll(strings.ReplaceAll(s, "\r\n", "\n"), "\r", "\n")
}

// jsonString quotes raw as a JSON string, escaping what JSON requires and
// leaving other bytes as they are, invalid UTF-8 included: Go's encoder
// would repair it, and the point is the server's repair.
func jsonString(raw string) string {
	var b strings.Builder
	b.WriteByte('"')
	for i := 0; i < len(raw); i++ {
		switch c := raw[i]; {
		case c == '"' || c == '\\':
			b.WriteByte('\\')
			b.WriteByte(c)
		case c == '\n':
			b.WriteString(`\n`)
		case c == '\r':
			b.WriteString(`\r`)
		case c < 0x20:
			b.WriteString(`\u00`)
			b.WriteByte("0123456789abcdef"[c>>4])
			b.WriteByte("0123456789abcdef"[c&15])
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte('"')
	return b.String()
}

// hostileGen makes the payloads from a fixed seed.
type hostileGen struct{ rng *mrand.Rand }

func (g *hostileGen) text(maxTokens int) text {
	var t text
	for n := g.rng.IntN(maxTokens + 1); n > 0; n-- {
		t = t.add(hostileTokens[g.rng.IntN(len(hostileTokens))])
	}
	return t
}

// huge is about 512 KiB of text with line breaks of every kind and a few
// invalid bytes.
func (g *hostileGen) huge() text {
	var raw, data strings.Builder
	breaks := []string{"\n", "\r", "\r\n"}
	for raw.Len() < 512<<10 {
		line := strings.Repeat(string(rune('a'+g.rng.IntN(26))), 1+g.rng.IntN(200))
		raw.WriteString(line)
		data.WriteString(line)
		if g.rng.IntN(50) == 0 {
			raw.WriteByte(0xFF)
			data.WriteString(fffd)
		}
		br := breaks[g.rng.IntN(len(breaks))]
		raw.WriteString(br)
		data.WriteString(br)
	}
	return text{raw: raw.String(), data: data.String()}
}

// payload returns the i-th data text: mostly random, some hand-made, a few
// huge.
func (g *hostileGen) payload(i int) text {
	switch {
	case i%500 == 250:
		return g.huge()
	case i < len(hostileFixed):
		return hostileFixed[i]
	case g.rng.IntN(20) == 0:
		return hostileFixed[g.rng.IntN(len(hostileFixed))]
	}
	return g.text(40)
}

// envelopeFor wraps data in the i-th envelope and returns the payload and
// the event the client must read, given the id and retry it holds from the
// previous events (a client keeps both until a new value comes).
func (g *hostileGen) envelopeFor(i int, data text, prev sseclient.Event) (string, sseclient.Event) {
	want := sseclient.Event{Event: "message", ID: prev.ID, Retry: prev.Retry}
	switch k := g.rng.IntN(20); {
	case k == 0:
		// Not an envelope: delivered as raw data, with no id of its own.
		bad := []string{
			`{"id":"x"`, `{"event":5,"data":"d"}`, `{"retry":-5}`, `{"retry":1.5}`,
			`{"close":"yes"}`, `["array"]`, `"a string"`, `null`, `{"data":"x"} trailing`,
			"{\"data\":\"raw\nnewline\"}", `{"id":"a"}{"id":"b"}`,
		}
		p := bad[g.rng.IntN(len(bad))]
		want.Data = normalise(p)
		return p, want
	case k == 1:
		// Data that is not a string is sent compactly encoded, on one line.
		id := plain("obj-").add(plain(string(rune('a' + i%26))))
		want.ID, want.Data = id.field, `{"k":"v\n\r","n":[1,2,{"x":null}],"s":"data: x"}`
		return `{ "id" : ` + jsonString(id.raw) + ` , "data" : { "k" : "v\n\r" , "n" : [ 1 , 2 , { "x" : null } ] , "s" : "data: x" } }`, want
	case k == 2:
		// Escapes: \u0000 is data; a lone surrogate is U+FFFD.
		want.ID, want.Data = "s"+fffd, "a\x00b😀"+fffd
		return `{"id":"s\ud800","data":"a\u0000b\ud83d\ude00\udc00"}`, want
	}
	// The id always changes, so that a field injected into a frame would
	// show; the event is random text, often empty.
	id := plain("m").add(plain(strings.Repeat("x", i%7))).add(g.text(6))
	event := g.text(4)
	p := `{"id":` + jsonString(id.raw) + `,"event":` + jsonString(event.raw) + `,"data":` + jsonString(data.raw)
	if g.rng.IntN(10) == 0 {
		ms := g.rng.IntN(100000)
		p += `,"retry":` + itoa(ms)
		want.Retry = itoa(ms)
	}
	p += "}"
	want.ID, want.Data = id.field, normalise(data.data)
	if event.field != "" {
		want.Event = event.field
	}
	return p, want
}

func itoa(n int) string { return strconv.Itoa(n) }

// TestHostilePayloads publishes 10,000 random and adversarial payloads
// through a real Redis to a raw and an envelope stream, and checks that
// each arrives as exactly one event with the intended data and fields, and
// that the wire holds nothing but well-formed fields.
func TestHostilePayloads(t *testing.T) {
	caddyproc.SkipShort(t)
	const total, batch = 10000, 200
	rs := redistest.Start(t)
	in := caddyproc.Start(t, hostileCaddyfile, caddyproc.Options{"{REDIS}": rs.URL()})
	rdb := rs.Client()
	raw := ssetest.Open(t, in.URL()+"/raw")
	env := ssetest.Open(t, in.URL()+"/envelope")
	ssetest.WaitNumsub(t, rdb, "hostile:raw", 1, 5*time.Second)
	ssetest.WaitNumsub(t, rdb, "hostile:env", 1, 5*time.Second)

	g := &hostileGen{rng: mrand.New(mrand.NewPCG(20240611, 42))}
	var prevEnv sseclient.Event
	ctx := context.Background()
	for start := 0; start < total; start += batch {
		var rawWant, envWant []sseclient.Event
		var payloads [][2]string
		for i := start; i < start+batch; i++ {
			data := g.payload(i)
			p, w := g.envelopeFor(i, data, prevEnv)
			prevEnv = w
			payloads = append(payloads, [2]string{data.raw, p})
			rawWant = append(rawWant, sseclient.Event{Event: "message", Data: normalise(data.data)})
			envWant = append(envWant, w)
		}
		pipe := rdb.Pipeline()
		for _, p := range payloads {
			pipe.Publish(ctx, "hostile:raw", p[0])
			pipe.Publish(ctx, "hostile:env", p[1])
		}
		if _, err := pipe.Exec(ctx); err != nil {
			t.Fatal(err)
		}
		// Events arrive in publish order, so the n-th event is the n-th
		// payload's: a frame split in two, or merged, shifts every later one.
		for j := range payloads {
			for _, c := range []struct {
				name string
				s    *sseclient.Stream
				want sseclient.Event
				p    string
			}{{"raw", raw, rawWant[j], payloads[j][0]}, {"envelope", env, envWant[j], payloads[j][1]}} {
				got, err := c.s.Next(10 * time.Second)
				if err != nil {
					t.Fatalf("%s stream, payload %d: %v", c.name, start+j, err)
				}
				if got != c.want {
					t.Fatalf("%s stream, payload %d %.200q:\n got %.300q\nwant %.300q", c.name, start+j, c.p, fmt.Sprintf("%+v", got), fmt.Sprintf("%+v", c.want))
				}
			}
		}
	}
	ssetest.NoEvent(t, raw, 100*time.Millisecond)
	ssetest.NoEvent(t, env, 10*time.Millisecond)

	// On the wire: valid UTF-8, no CR at all, and only the fields each
	// stream may carry; one blank line per event.
	for _, c := range []struct {
		name   string
		s      *sseclient.Stream
		fields []string
	}{{"raw", raw, []string{"data: "}}, {"envelope", env, []string{"data: ", "id: ", "event: ", "retry: "}}} {
		wire := c.s.Raw()
		if !utf8.ValidString(wire) {
			t.Errorf("%s stream: invalid UTF-8 on the wire", c.name)
		}
		if strings.ContainsRune(wire, '\r') {
			t.Errorf("%s stream: a CR reached the wire", c.name)
		}
		blank := 0
		for n, line := range strings.Split(strings.TrimSuffix(wire, "\n"), "\n") {
			switch {
			case line == "":
				blank++
			case line == ":":
			case hasAnyPrefix(line, c.fields):
			default:
				t.Fatalf("%s stream: line %d is not a field it may carry: %.100q", c.name, n, line)
			}
		}
		if blank != total {
			t.Errorf("%s stream: %d blank lines on the wire, want one per event: %d", c.name, blank, total)
		}
	}
}

func hasAnyPrefix(s string, prefixes []string) bool {
	for _, p := range prefixes {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

// TestSecurityReadmeJWTExample runs the README's JWT example as written (the
// README test skips it: its comment holds a syntax summary), with the
// secret and Redis from the environment.
func TestSecurityReadmeJWTExample(t *testing.T) {
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	var example string
	for _, m := range caddyfileBlock.FindAllStringSubmatch(string(b), -1) {
		if strings.Contains(m[1], "jwt {") && !strings.Contains(m[1], "key      <secret>") {
			example = m[1]
		}
	}
	if example == "" {
		t.Fatal("no JWT example in the README")
	}
	rs := redistest.Start(t)
	cf := globalOptions + "http://127.0.0.1:{HTTP} {\n" + example + "}\n"
	in := caddyproc.Start(t, cf, nil, "REDIS_URL="+rs.URL(), "SSE_JWT_SECRET="+jwtSecret)
	e := &secEnv{rdb: rs, caddy: in}

	e.refused(t, "/events?room=lobby", http.StatusUnauthorized)
	tok := hs(t, []string{"user:42", "room:*"})
	s := e.open(t, "/events?room=lobby&access_token="+tok)
	e.expectOnly(t, s, []string{"user:41", "room:lobby", "user:42", "room:other"}, "room:lobby", "user:42")
	e.refused(t, "/events?room=lobby&access_token="+hs(t, "user:42"), http.StatusForbidden)
}

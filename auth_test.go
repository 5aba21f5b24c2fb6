package caddysse

import (
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/golang-jwt/jwt/v5"
	"go.uber.org/zap"
)

// The verification itself is auth/'s and tested there; these tests cover
// what the handler adds: the key's placeholders, the option names in
// errors, the placeholders a token sets and the answers to refusals.

const testSecret = "0123456789abcdef0123456789abcdef" // 32 bytes, the HS256 minimum

// jwtHandler returns a provisioned-enough handler with cfg as its jwt.
func jwtHandler(t *testing.T, cfg *JWTConfig) *Handler {
	t.Helper()
	h := &Handler{JWT: cfg, logger: zap.NewNop()}
	if err := cfg.compile(); err != nil {
		t.Fatalf("compile: %v", err)
	}
	return h
}

func hs256(t *testing.T, claims jwt.MapClaims) string {
	t.Helper()
	base := jwt.MapClaims{"sub": "42", "exp": time.Now().Add(time.Hour).Unix(), "channels": []string{"user:42", "room:*"}}
	for k, v := range claims {
		base[k] = v
	}
	s, err := jwt.NewWithClaims(jwt.SigningMethodHS256, base).SignedString([]byte(testSecret))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// check runs authenticate and authorize as ServeHTTP does.
func check(h *Handler, r *http.Request, channels ...string) (int, string, *caddy.Replacer) {
	repl := caddy.NewReplacer()
	g, status, reason := h.authenticate(r, repl)
	if status != 0 {
		return status, reason, repl
	}
	status, reason = h.authorize(g, channels)
	return status, reason, repl
}

func bearerRequest(tok string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "/events", nil)
	r.Header.Set("Authorization", "Bearer "+tok)
	return r
}

func TestJWTHandler(t *testing.T) {
	h := jwtHandler(t, &JWTConfig{Key: testSecret})

	t.Run("admitted", func(t *testing.T) {
		if status, reason, _ := check(h, bearerRequest(hs256(t, nil)), "user:42", "room:lobby"); status != 0 {
			t.Fatalf("%d %s", status, reason)
		}
	})
	t.Run("not granted", func(t *testing.T) {
		if status, _, _ := check(h, bearerRequest(hs256(t, nil)), "user:43"); status != http.StatusForbidden {
			t.Fatalf("status %d, want 403", status)
		}
	})
	t.Run("missing", func(t *testing.T) {
		status, reason, _ := check(h, httptest.NewRequest(http.MethodGet, "/events", nil), "user:42")
		if status != http.StatusUnauthorized || reason != "missing token" {
			t.Fatalf("got %d %q", status, reason)
		}
	})
	t.Run("subject placeholders", func(t *testing.T) {
		status, _, repl := check(h, bearerRequest(hs256(t, nil)), "user:42")
		for _, name := range []string{"http.sse.jwt.sub", "sse.jwt.sub"} {
			if got, _ := repl.GetString(name); status != 0 || got != "42" {
				t.Errorf("status %d, {%s} = %q", status, name, got)
			}
		}
	})
	t.Run("a failed token sets no subject", func(t *testing.T) {
		_, _, repl := check(h, bearerRequest(hs256(t, jwt.MapClaims{"exp": 1})), "user:42")
		for _, name := range []string{"http.sse.jwt.sub", "sse.jwt.sub"} {
			if got, ok := repl.GetString(name); ok || got != "" {
				t.Errorf("{%s} = %q after a refused token", name, got)
			}
		}
	})
	t.Run("the stream ends with the token", func(t *testing.T) {
		exp := time.Now().Add(time.Hour).Truncate(time.Second)
		g, status, _ := h.authenticate(bearerRequest(hs256(t, jwt.MapClaims{"exp": exp.Unix()})), nil)
		if status != 0 || !g.expires.Equal(exp) {
			t.Fatalf("status %d, grant expires %v, want %v", status, g.expires, exp)
		}
	})
	t.Run("without jwt everything passes", func(t *testing.T) {
		open := &Handler{logger: zap.NewNop()}
		if status, reason, _ := check(open, httptest.NewRequest(http.MethodGet, "/events", nil), "user:42"); status != 0 {
			t.Fatalf("%d %s", status, reason)
		}
	})
	t.Run("secret from a file placeholder", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "secret")
		// A trailing newline, as editors and `echo` leave, is not part of it.
		if err := os.WriteFile(path, []byte(testSecret+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		fh := jwtHandler(t, &JWTConfig{Key: "{file." + path + "}"})
		if status, reason, _ := check(fh, bearerRequest(hs256(t, nil)), "user:42"); status != 0 {
			t.Fatalf("%d %s", status, reason)
		}
	})
	t.Run("secret from an environment placeholder", func(t *testing.T) {
		t.Setenv("SSE_TEST_JWT_SECRET", testSecret)
		eh := jwtHandler(t, &JWTConfig{Key: "{env.SSE_TEST_JWT_SECRET}"})
		if status, reason, _ := check(eh, bearerRequest(hs256(t, nil)), "user:42"); status != 0 {
			t.Fatalf("%d %s", status, reason)
		}
	})
}

func TestJWTCompileErrors(t *testing.T) {
	t.Setenv("SSE_TEST_EMPTY", "")
	for _, tt := range []struct {
		name string
		cfg  JWTConfig
		want string
	}{
		{"no key", JWTConfig{}, "jwt: key"},
		{"short secret", JWTConfig{Key: "short"}, "jwt: key: an HS256 secret must be at least 32 bytes"},
		{"secret from an unset variable", JWTConfig{Key: "{env.SSE_TEST_EMPTY}"}, "jwt: key: '{env.SSE_TEST_EMPTY}' expands to nothing"},
		{"unknown alg", JWTConfig{Key: testSecret, Alg: "none"}, "jwt: alg"},
		{"missing key file", JWTConfig{Alg: "RS256", Key: filepath.Join(t.TempDir(), "nope.pem")}, "jwt: key"},
		{"two places in one source", JWTConfig{Key: testSecret, From: []JWTSource{{Query: "a", Cookie: "b"}}}, "jwt: from"},
	} {
		cfg := tt.cfg
		err := cfg.compile()
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: error %v, want one containing %q", tt.name, err, tt.want)
		}
	}
}

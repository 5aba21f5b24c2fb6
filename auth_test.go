package caddysse

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
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

const testSecret = "0123456789abcdef0123456789abcdef" // 32 bytes, the HS256 minimum

func TestWildcardMatch(t *testing.T) {
	tests := []struct {
		pattern, s string
		want       bool
	}{
		{"user:42", "user:42", true},
		{"user:42", "user:420", false},
		{"user:42", "user:4", false},
		{"room:*", "room:lobby", true},
		{"room:*", "room:", true},
		{"room:*", "room", false},
		{"room:*", "rooms:x", false},
		{"*", "", true},
		{"*", "anything:at:all", true},
		{"*:42", "user:42", true},
		{"*:42", "user:43", false},
		{"a*b*c", "abc", true},
		{"a*b*c", "axxbyyc", true},
		{"a*b*c", "axxbyy", false},
		{"a*b*c", "acb", false},
		{"team:*:read", "team:7:read", true},
		{"team:*:read", "team:7:write", false},
		{"**", "x", true},
		{"", "", true},
		{"", "x", false},
		{"x", "", false},
		{"a*", "b", false},
		{strings.Repeat("*a", 50) + "b", strings.Repeat("a", 10000), false}, // must return quickly
	}
	for _, tt := range tests {
		if got := wildcardMatch(tt.pattern, tt.s); got != tt.want {
			t.Errorf("wildcardMatch(%q, %.20q) = %v, want %v", tt.pattern, tt.s, got, tt.want)
		}
	}
}

func TestBearer(t *testing.T) {
	tests := []struct {
		v        string
		required bool
		want     string
	}{
		{"Bearer abc", true, "abc"},
		{"bearer abc", true, "abc"},
		{"  Bearer abc  ", true, "abc"},
		{"Basic YWxpY2U6eA==", true, ""},
		{"abc", true, ""},
		{"abc", false, "abc"},
		{"Bearer abc", false, "abc"},
		{"Basic abc", false, ""},
		{"", false, ""},
	}
	for _, tt := range tests {
		if got := bearer(tt.v, tt.required); got != tt.want {
			t.Errorf("bearer(%q, %v) = %q, want %q", tt.v, tt.required, got, tt.want)
		}
	}
}

// jwtHandler returns a provisioned-enough handler with cfg as its jwt.
func jwtHandler(t *testing.T, cfg *JWTConfig) *Handler {
	t.Helper()
	h := &Handler{JWT: cfg, logger: zap.NewNop()}
	if err := cfg.compile(); err != nil {
		t.Fatalf("compile: %v", err)
	}
	return h
}

func sign(t *testing.T, method jwt.SigningMethod, key any, claims jwt.MapClaims) string {
	t.Helper()
	s, err := jwt.NewWithClaims(method, claims).SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func valid(extra jwt.MapClaims) jwt.MapClaims {
	c := jwt.MapClaims{"sub": "42", "exp": time.Now().Add(time.Hour).Unix(), "channels": []string{"user:42", "room:*"}}
	for k, v := range extra {
		if v == nil {
			delete(c, k)
		} else {
			c[k] = v
		}
	}
	return c
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

func TestJWTHS256(t *testing.T) {
	h := jwtHandler(t, &JWTConfig{Key: testSecret})
	key := []byte(testSecret)
	hs := func(extra jwt.MapClaims) string { return sign(t, jwt.SigningMethodHS256, key, valid(extra)) }

	tests := []struct {
		name     string
		token    string
		channels []string
		status   int
	}{
		{"valid, exact channel", hs(nil), []string{"user:42"}, 0},
		{"valid, wildcard channel", hs(nil), []string{"room:lobby", "user:42"}, 0},
		{"one channel not granted", hs(nil), []string{"user:42", "user:43"}, http.StatusForbidden},
		{"claim a single string", hs(jwt.MapClaims{"channels": "user:42"}), []string{"user:42"}, 0},
		{"claim missing", hs(jwt.MapClaims{"channels": nil}), []string{"user:42"}, http.StatusForbidden},
		{"claim of the wrong type", hs(jwt.MapClaims{"channels": 42}), []string{"user:42"}, http.StatusForbidden},
		{"expired", hs(jwt.MapClaims{"exp": time.Now().Add(-time.Hour).Unix()}), []string{"user:42"}, http.StatusUnauthorized},
		// Within the leeway the token is valid, but a stream on it would
		// end at once: refused, so that the client fetches a fresh one.
		{"expired within leeway", hs(jwt.MapClaims{"exp": time.Now().Add(-5 * time.Second).Unix()}), []string{"user:42"}, http.StatusUnauthorized},
		{"not valid yet within leeway", hs(jwt.MapClaims{"nbf": time.Now().Add(5 * time.Second).Unix()}), []string{"user:42"}, 0},
		{"no exp", hs(jwt.MapClaims{"exp": nil}), []string{"user:42"}, http.StatusUnauthorized},
		{"not valid yet", hs(jwt.MapClaims{"nbf": time.Now().Add(time.Hour).Unix()}), []string{"user:42"}, http.StatusUnauthorized},
		{"issued in the future", hs(jwt.MapClaims{"iat": time.Now().Add(time.Hour).Unix()}), []string{"user:42"}, http.StatusUnauthorized},
		{"wrong secret", sign(t, jwt.SigningMethodHS256, []byte(strings.Repeat("x", 32)), valid(nil)), []string{"user:42"}, http.StatusUnauthorized},
		{"other HMAC alg", sign(t, jwt.SigningMethodHS512, key, valid(nil)), []string{"user:42"}, http.StatusUnauthorized},
		{"alg none", sign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, valid(nil)), []string{"user:42"}, http.StatusUnauthorized},
		{"garbage", "not.a.token", []string{"user:42"}, http.StatusUnauthorized},
		{"oversized", strings.Repeat("a", maxTokenLen+1), []string{"user:42"}, http.StatusUnauthorized},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, reason, _ := check(h, bearerRequest(tt.token), tt.channels...)
			if status != tt.status {
				t.Fatalf("status %d (%s), want %d", status, reason, tt.status)
			}
		})
	}

	t.Run("secret from a file placeholder", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "secret")
		// A trailing newline, as editors and `echo` leave, is not part of it.
		if err := os.WriteFile(path, []byte(testSecret+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		fh := jwtHandler(t, &JWTConfig{Key: "{file." + path + "}"})
		if status, reason, _ := check(fh, bearerRequest(hs(nil)), "user:42"); status != 0 {
			t.Fatalf("%d %s", status, reason)
		}
	})
	t.Run("missing", func(t *testing.T) {
		status, reason, _ := check(h, httptest.NewRequest(http.MethodGet, "/events", nil), "user:42")
		if status != http.StatusUnauthorized || reason != "missing token" {
			t.Fatalf("got %d %q", status, reason)
		}
	})
	t.Run("subject placeholder", func(t *testing.T) {
		status, _, repl := check(h, bearerRequest(hs(nil)), "user:42")
		if got, _ := repl.GetString("sse.jwt.sub"); status != 0 || got != "42" {
			t.Fatalf("status %d, {sse.jwt.sub} = %q", status, got)
		}
	})
	t.Run("a failed token sets no subject", func(t *testing.T) {
		_, _, repl := check(h, bearerRequest(hs(jwt.MapClaims{"exp": 1})), "user:42")
		if got, ok := repl.GetString("sse.jwt.sub"); ok || got != "" {
			t.Fatalf("{sse.jwt.sub} = %q after a refused token", got)
		}
	})
}

func TestJWTSources(t *testing.T) {
	key := []byte(testSecret)
	good := sign(t, jwt.SigningMethodHS256, key, valid(nil))
	bad := sign(t, jwt.SigningMethodHS256, key, valid(jwt.MapClaims{"exp": 1}))
	req := func(header, cookie, query string) *http.Request {
		r := httptest.NewRequest(http.MethodGet, "/events", nil)
		if header != "" {
			r.Header.Set("Authorization", header)
		}
		if cookie != "" {
			r.AddCookie(&http.Cookie{Name: "access_token", Value: cookie})
		}
		if query != "" {
			r.URL.RawQuery = "access_token=" + query
		}
		return r
	}

	def := jwtHandler(t, &JWTConfig{Key: testSecret})
	for _, tt := range []struct {
		name   string
		r      *http.Request
		status int
	}{
		{"header", req("Bearer "+good, "", ""), 0},
		{"cookie", req("", good, ""), 0},
		{"query", req("", "", good), 0},
		{"basic auth header is skipped", req("Basic YWxpY2U6eA==", "", good), 0},
		{"the first token found decides", req("Bearer "+bad, "", good), http.StatusUnauthorized},
		{"none", req("", "", ""), http.StatusUnauthorized},
	} {
		if status, reason, _ := check(def, tt.r, "user:42"); status != tt.status {
			t.Errorf("default sources, %s: %d %s, want %d", tt.name, status, reason, tt.status)
		}
	}

	// Only the query parameter "t": a token elsewhere is not looked at.
	onlyQuery := jwtHandler(t, &JWTConfig{Key: testSecret, From: []JWTSource{{Query: "t"}}})
	r := req("Bearer "+good, good, "")
	if status, _, _ := check(onlyQuery, r, "user:42"); status != http.StatusUnauthorized {
		t.Errorf("from query t: a token in the header or cookie was accepted")
	}
	r = httptest.NewRequest(http.MethodGet, "/events?t="+good, nil)
	if status, reason, _ := check(onlyQuery, r, "user:42"); status != 0 {
		t.Errorf("from query t: %d %s", status, reason)
	}

	// A custom header takes the token bare or with Bearer.
	custom := jwtHandler(t, &JWTConfig{Key: testSecret, From: []JWTSource{{Header: "X-Token"}}})
	for _, v := range []string{good, "Bearer " + good} {
		r := httptest.NewRequest(http.MethodGet, "/events", nil)
		r.Header.Set("X-Token", v)
		if status, reason, _ := check(custom, r, "user:42"); status != 0 {
			t.Errorf("from header X-Token %.10q: %d %s", v, status, reason)
		}
	}
}

func TestJWTIssuerAudienceAndClaimName(t *testing.T) {
	key := []byte(testSecret)
	h := jwtHandler(t, &JWTConfig{Key: testSecret, Issuer: "https://auth.example", Audience: "sse", Claim: "https://example.com/channels"})
	claims := func(iss, aud string) jwt.MapClaims {
		return valid(jwt.MapClaims{"iss": iss, "aud": aud, "channels": nil, "https://example.com/channels": []string{"user:42"}})
	}
	for _, tt := range []struct {
		name   string
		claims jwt.MapClaims
		status int
	}{
		{"matching", claims("https://auth.example", "sse"), 0},
		{"other issuer", claims("https://evil.example", "sse"), http.StatusUnauthorized},
		{"other audience", claims("https://auth.example", "billing"), http.StatusUnauthorized},
		{"default claim name is not read", valid(jwt.MapClaims{"iss": "https://auth.example", "aud": "sse"}), http.StatusForbidden},
	} {
		if status, reason, _ := check(h, bearerRequest(sign(t, jwt.SigningMethodHS256, key, tt.claims)), "user:42"); status != tt.status {
			t.Errorf("%s: %d %s, want %d", tt.name, status, reason, tt.status)
		}
	}
}

func writePEM(t *testing.T, typ string, der []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "key.pem")
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestJWTPublicKeys(t *testing.T) {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	rsaDER, _ := x509.MarshalPKIXPublicKey(&rsaKey.PublicKey)
	rsaPath := writePEM(t, "PUBLIC KEY", rsaDER)
	ecKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ecDER, _ := x509.MarshalPKIXPublicKey(&ecKey.PublicKey)
	ecPath := writePEM(t, "PUBLIC KEY", ecDER)

	rs := jwtHandler(t, &JWTConfig{Alg: "RS256", Key: rsaPath})
	es := jwtHandler(t, &JWTConfig{Alg: "ES256", Key: ecPath})

	otherRSA, _ := rsa.GenerateKey(rand.Reader, 2048)
	otherEC, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rsaPEM, _ := os.ReadFile(rsaPath)

	for _, tt := range []struct {
		name   string
		h      *Handler
		token  string
		status int
	}{
		{"RS256", rs, sign(t, jwt.SigningMethodRS256, rsaKey, valid(nil)), 0},
		{"RS256 other key", rs, sign(t, jwt.SigningMethodRS256, otherRSA, valid(nil)), http.StatusUnauthorized},
		{"RS512 with the right key", rs, sign(t, jwt.SigningMethodRS512, rsaKey, valid(nil)), http.StatusUnauthorized},
		// The classic confusion: HS256 "signed" with the public key as the secret.
		{"HS256 with the public key as secret", rs, sign(t, jwt.SigningMethodHS256, rsaPEM, valid(nil)), http.StatusUnauthorized},
		{"ES256", es, sign(t, jwt.SigningMethodES256, ecKey, valid(nil)), 0},
		{"ES256 other key", es, sign(t, jwt.SigningMethodES256, otherEC, valid(nil)), http.StatusUnauthorized},
		{"RS256 token to ES256", es, sign(t, jwt.SigningMethodRS256, rsaKey, valid(nil)), http.StatusUnauthorized},
		{"alg none to RS256", rs, sign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, valid(nil)), http.StatusUnauthorized},
	} {
		if status, reason, _ := check(tt.h, bearerRequest(tt.token), "user:42"); status != tt.status {
			t.Errorf("%s: %d %s, want %d", tt.name, status, reason, tt.status)
		}
	}

	// The PEM text itself (from an environment variable) does as well as
	// a file.
	t.Setenv("SSE_TEST_JWT_PEM", string(rsaPEM))
	inline := jwtHandler(t, &JWTConfig{Alg: "RS256", Key: "{env.SSE_TEST_JWT_PEM}"})
	if status, reason, _ := check(inline, bearerRequest(sign(t, jwt.SigningMethodRS256, rsaKey, valid(nil))), "user:42"); status != 0 {
		t.Errorf("RS256 with inline PEM: %d %s", status, reason)
	}
}

func TestJWTCompileErrors(t *testing.T) {
	dir := t.TempDir()
	weakRSA, _ := rsa.GenerateKey(rand.Reader, 1024)
	weakDER, _ := x509.MarshalPKIXPublicKey(&weakRSA.PublicKey)
	weakPath := writePEM(t, "PUBLIC KEY", weakDER)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	p384DER, _ := x509.MarshalPKIXPublicKey(&p384.PublicKey)
	p384Path := writePEM(t, "PUBLIC KEY", p384DER)
	ecKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ecDER, _ := x509.MarshalPKIXPublicKey(&ecKey.PublicKey)
	ecPath := writePEM(t, "PUBLIC KEY", ecDER)
	privDER, _ := x509.MarshalECPrivateKey(ecKey)
	privPath := writePEM(t, "EC PRIVATE KEY", privDER)
	big := filepath.Join(dir, "big.pem")
	if err := os.WriteFile(big, make([]byte, maxKeyFile+10), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SSE_TEST_EMPTY", "")

	for _, tt := range []struct {
		name string
		cfg  JWTConfig
		want string
	}{
		{"no key", JWTConfig{}, "jwt: key"},
		{"short secret", JWTConfig{Key: "short"}, "at least 32 bytes"},
		{"secret from an unset variable", JWTConfig{Key: "{env.SSE_TEST_EMPTY}"}, "jwt: key"},
		{"unknown alg", JWTConfig{Key: testSecret, Alg: "none"}, "jwt: alg"},
		{"lower-case alg", JWTConfig{Key: testSecret, Alg: "hs256"}, "jwt: alg"},
		{"missing key file", JWTConfig{Alg: "RS256", Key: filepath.Join(dir, "nope.pem")}, "jwt: key"},
		{"oversized key file", JWTConfig{Alg: "RS256", Key: big}, "jwt: key"},
		{"weak RSA key", JWTConfig{Alg: "RS256", Key: weakPath}, "2048"},
		{"EC key for RS256", JWTConfig{Alg: "RS256", Key: ecPath}, "RSA"},
		{"P-384 key for ES256", JWTConfig{Alg: "ES256", Key: p384Path}, "P-256"},
		{"private key for ES256", JWTConfig{Alg: "ES256", Key: privPath}, "jwt: key"},
		{"empty source", JWTConfig{Key: testSecret, From: []JWTSource{{}}}, "jwt: from"},
		{"two places in one source", JWTConfig{Key: testSecret, From: []JWTSource{{Query: "a", Cookie: "b"}}}, "jwt: from"},
	} {
		cfg := tt.cfg
		err := cfg.compile()
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: error %v, want one containing %q", tt.name, err, tt.want)
		}
	}
}

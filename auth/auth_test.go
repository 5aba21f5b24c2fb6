package auth

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

	"github.com/golang-jwt/jwt/v5"
)

const testSecret = "0123456789abcdef0123456789abcdef" // 32 bytes, the HS256 minimum

func TestMatch(t *testing.T) {
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
		if got := Match(tt.pattern, tt.s); got != tt.want {
			t.Errorf("Match(%q, %.20q) = %v, want %v", tt.pattern, tt.s, got, tt.want)
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
		if got := Bearer(tt.v, tt.required); got != tt.want {
			t.Errorf("Bearer(%q, %v) = %q, want %q", tt.v, tt.required, got, tt.want)
		}
	}
}

func verifier(t *testing.T, o Options) *Verifier {
	t.Helper()
	v, err := New(o)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return v
}

func sign(t *testing.T, method jwt.SigningMethod, key any, claims jwt.MapClaims) string {
	t.Helper()
	s, err := jwt.NewWithClaims(method, claims).SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// valid returns claims valid for an hour granting user:42 and room:*, with
// extra set over them (a nil value deletes the claim).
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

// check verifies r and authorizes channels, as a stream request is
// admitted: 0 and the grant, or the refusal's status and reason.
func check(v *Verifier, r *http.Request, channels ...string) (int, string, *Grant) {
	g, refusal := v.Verify(r)
	if refusal == nil {
		refusal = g.Authorize(channels)
	}
	if refusal != nil {
		return refusal.Status, refusal.Reason, g
	}
	return 0, "", g
}

func bearerRequest(tok string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "/events", nil)
	r.Header.Set("Authorization", "Bearer "+tok)
	return r
}

func TestHS256(t *testing.T) {
	v := verifier(t, Options{Key: testSecret})
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
		{"oversized", strings.Repeat("a", MaxTokenLen+1), []string{"user:42"}, http.StatusUnauthorized},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, reason, _ := check(v, bearerRequest(tt.token), tt.channels...)
			if status != tt.status {
				t.Fatalf("status %d (%s), want %d", status, reason, tt.status)
			}
		})
	}

	t.Run("reasons", func(t *testing.T) {
		for _, tt := range []struct {
			r      *http.Request
			reason string
		}{
			{httptest.NewRequest(http.MethodGet, "/events", nil), ReasonMissing},
			{bearerRequest("not.a.token"), ReasonInvalid},
			{bearerRequest(hs(jwt.MapClaims{"exp": time.Now().Add(-time.Hour).Unix()})), ReasonExpired},
			{bearerRequest(hs(jwt.MapClaims{"nbf": time.Now().Add(time.Hour).Unix()})), ReasonNotYetValid},
		} {
			if _, reason, _ := check(v, tt.r, "user:42"); reason != tt.reason {
				t.Errorf("reason %q, want %q", reason, tt.reason)
			}
		}
	})
	t.Run("grant", func(t *testing.T) {
		exp := time.Now().Add(time.Hour).Truncate(time.Second)
		_, _, g := check(v, bearerRequest(hs(jwt.MapClaims{"exp": exp.Unix()})), "user:42")
		if g == nil || g.Subject != "42" || !g.Expires.Equal(exp) {
			t.Fatalf("grant %+v, want subject 42 expiring at %v", g, exp)
		}
	})
}

func TestSources(t *testing.T) {
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

	def := verifier(t, Options{Key: testSecret})
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
	onlyQuery := verifier(t, Options{Key: testSecret, From: []Source{{Query: "t"}}})
	r := req("Bearer "+good, good, "")
	if status, _, _ := check(onlyQuery, r, "user:42"); status != http.StatusUnauthorized {
		t.Errorf("from query t: a token in the header or cookie was accepted")
	}
	r = httptest.NewRequest(http.MethodGet, "/events?t="+good, nil)
	if status, reason, _ := check(onlyQuery, r, "user:42"); status != 0 {
		t.Errorf("from query t: %d %s", status, reason)
	}

	// A custom header takes the token bare or with Bearer.
	custom := verifier(t, Options{Key: testSecret, From: []Source{{Header: "X-Token"}}})
	for _, v := range []string{good, "Bearer " + good} {
		r := httptest.NewRequest(http.MethodGet, "/events", nil)
		r.Header.Set("X-Token", v)
		if status, reason, _ := check(custom, r, "user:42"); status != 0 {
			t.Errorf("from header X-Token %.10q: %d %s", v, status, reason)
		}
	}
}

func TestIssuerAudienceAndClaimName(t *testing.T) {
	key := []byte(testSecret)
	v := verifier(t, Options{Key: testSecret, Issuer: "https://auth.example", Audience: "sse", Claim: "https://example.com/channels"})
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
		if status, reason, _ := check(v, bearerRequest(sign(t, jwt.SigningMethodHS256, key, tt.claims)), "user:42"); status != tt.status {
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

func TestPublicKeys(t *testing.T) {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	rsaDER, _ := x509.MarshalPKIXPublicKey(&rsaKey.PublicKey)
	rsaPath := writePEM(t, "PUBLIC KEY", rsaDER)
	ecKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ecDER, _ := x509.MarshalPKIXPublicKey(&ecKey.PublicKey)
	ecPath := writePEM(t, "PUBLIC KEY", ecDER)

	rs := verifier(t, Options{Alg: "RS256", Key: rsaPath})
	es := verifier(t, Options{Alg: "ES256", Key: ecPath})

	otherRSA, _ := rsa.GenerateKey(rand.Reader, 2048)
	otherEC, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rsaPEM, _ := os.ReadFile(rsaPath)

	for _, tt := range []struct {
		name   string
		v      *Verifier
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
		if status, reason, _ := check(tt.v, bearerRequest(tt.token), "user:42"); status != tt.status {
			t.Errorf("%s: %d %s, want %d", tt.name, status, reason, tt.status)
		}
	}

	// The PEM text itself does as well as a file.
	inline := verifier(t, Options{Alg: "RS256", Key: string(rsaPEM)})
	if status, reason, _ := check(inline, bearerRequest(sign(t, jwt.SigningMethodRS256, rsaKey, valid(nil))), "user:42"); status != 0 {
		t.Errorf("RS256 with inline PEM: %d %s", status, reason)
	}
}

func TestNewErrors(t *testing.T) {
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

	for _, tt := range []struct {
		name string
		o    Options
		want string
	}{
		{"no key", Options{}, "key: required"},
		{"blank key", Options{Key: "  "}, "key: required"},
		{"short secret", Options{Key: "short"}, "at least 32 bytes"},
		{"unknown alg", Options{Key: testSecret, Alg: "none"}, "alg:"},
		{"lower-case alg", Options{Key: testSecret, Alg: "hs256"}, "alg:"},
		{"missing key file", Options{Alg: "RS256", Key: filepath.Join(dir, "nope.pem")}, "key:"},
		{"oversized key file", Options{Alg: "RS256", Key: big}, "key:"},
		{"weak RSA key", Options{Alg: "RS256", Key: weakPath}, "2048"},
		{"EC key for RS256", Options{Alg: "RS256", Key: ecPath}, "RSA"},
		{"P-384 key for ES256", Options{Alg: "ES256", Key: p384Path}, "P-256"},
		{"private key for ES256", Options{Alg: "ES256", Key: privPath}, "key:"},
		{"empty source", Options{Key: testSecret, From: []Source{{}}}, "from:"},
		{"two places in one source", Options{Key: testSecret, From: []Source{{Query: "a", Cookie: "b"}}}, "from:"},
	} {
		_, err := New(tt.o)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: error %v, want one containing %q", tt.name, err, tt.want)
		}
	}
}

func TestChallenge(t *testing.T) {
	for _, tt := range []struct {
		r    Refusal
		want string
	}{
		{Refusal{Status: http.StatusUnauthorized, Reason: ReasonMissing}, `Bearer realm="sse"`},
		{Refusal{Status: http.StatusUnauthorized, Reason: ReasonExpired}, `Bearer realm="sse", error="invalid_token"`},
		{Refusal{Status: http.StatusForbidden, Reason: ReasonNotGranted}, `Bearer realm="sse", error="insufficient_scope"`},
		{Refusal{Status: http.StatusBadRequest, Reason: "no channel"}, ""},
	} {
		if got := tt.r.Challenge(); got != tt.want {
			t.Errorf("%d %s: %q, want %q", tt.r.Status, tt.r.Reason, got, tt.want)
		}
	}
}

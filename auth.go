package caddysse

// This file authenticates streams with a JSON Web Token (the `jwt` option)
// and checks that the token grants every channel of the stream.

import (
	"crypto/elliptic"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/golang-jwt/jwt/v5"
	"go.uber.org/zap"
)

// JWTConfig authenticates every stream request with a JSON Web Token whose
// claim lists the channels it may subscribe to.
type JWTConfig struct {
	// Key verifies the signature. For HS256 it is the shared secret, at
	// least 32 bytes; for RS256 and ES256 the path of a PEM file holding the
	// public key (or a certificate), or the PEM text itself. Placeholders
	// such as {env.SSE_JWT_SECRET} are expanded at load time.
	Key string `json:"key,omitempty"`

	// Alg is the one signing algorithm accepted: HS256 (the default), RS256
	// or ES256. A token signed otherwise, or not at all, is refused.
	Alg string `json:"alg,omitempty"`

	// From lists where the token is looked for, in order; the first place
	// that holds one is used. Default: the Authorization header (Bearer
	// scheme), then the access_token cookie, then the access_token query
	// parameter (EventSource cannot set headers).
	From []JWTSource `json:"from,omitempty"`

	// Claim names the claim listing the channels the token grants: a string
	// or an array of strings, each a channel name or a pattern in which `*`
	// stands for any run of characters (such as room:*). Every channel of
	// the stream must match one. Default: "channels".
	Claim string `json:"claim,omitempty"`

	// Issuer, when set, must equal the token's iss claim.
	Issuer string `json:"issuer,omitempty"`

	// Audience, when set, must be one of the token's aud values.
	Audience string `json:"audience,omitempty"`

	alg    string
	key    any // []byte, *rsa.PublicKey or *ecdsa.PublicKey, by alg
	from   []JWTSource
	claim  string
	parser *jwt.Parser
}

// JWTSource is one place a token may be found; exactly one field is set.
type JWTSource struct {
	// Header names a request header. In Authorization the token must follow
	// the Bearer scheme; in any other header a "Bearer " prefix is optional.
	Header string `json:"header,omitempty"`
	// Cookie names a cookie holding the token.
	Cookie string `json:"cookie,omitempty"`
	// Query names a query parameter holding the token.
	Query string `json:"query,omitempty"`
}

const (
	defaultJWTAlg   = "HS256"
	defaultJWTClaim = "channels"
	// defaultTokenName is the cookie and query parameter looked at by
	// default, the query parameter name of RFC 6750.
	defaultTokenName = "access_token"
	// jwtLeeway absorbs clock skew between the token issuer and Caddy.
	jwtLeeway = 30 * time.Second
	// maxTokenLen refuses oversized tokens before any parsing.
	maxTokenLen = 16 << 10
	// maxKeyFile bounds the read of a key file (a path such as /dev/zero
	// must not hang the config load).
	maxKeyFile = 1 << 20
	// minHMACKey is RFC 7518's minimum for HS256: the hash's size.
	minHMACKey = 32
	// minRSABits refuses keys that are too weak to trust.
	minRSABits = 2048
)

// jwtAlgs are the accepted values of alg.
var jwtAlgs = []string{"HS256", "RS256", "ES256"}

func defaultJWTSources() []JWTSource {
	return []JWTSource{
		{Header: "Authorization"},
		{Cookie: defaultTokenName},
		{Query: defaultTokenName},
	}
}

// validate checks what can be checked without reading keys; every error
// names the option.
func (j *JWTConfig) validate() error {
	alg := j.Alg
	if alg == "" {
		alg = defaultJWTAlg
	}
	if !contains(jwtAlgs, alg) {
		return fmt.Errorf("jwt: alg: want one of %s, got '%s'", strings.Join(jwtAlgs, ", "), j.Alg)
	}
	if strings.TrimSpace(j.Key) == "" {
		return errors.New("jwt: key: required")
	}
	for _, s := range j.From {
		if err := s.validate(); err != nil {
			return fmt.Errorf("jwt: from: %w", err)
		}
	}
	return nil
}

func (s JWTSource) validate() error {
	n := 0
	for _, v := range []string{s.Header, s.Cookie, s.Query} {
		if v != "" {
			n++
		}
	}
	if n != 1 {
		return errors.New("each source names exactly one header, cookie or query parameter")
	}
	return nil
}

// compile loads the key (expanding placeholders and reading the key file)
// and builds the parser. It runs at provision.
func (j *JWTConfig) compile() error {
	if err := j.validate(); err != nil {
		return err
	}
	j.alg = j.Alg
	if j.alg == "" {
		j.alg = defaultJWTAlg
	}
	j.claim = j.Claim
	if j.claim == "" {
		j.claim = defaultJWTClaim
	}
	j.from = j.From
	if len(j.from) == 0 {
		j.from = defaultJWTSources()
	}
	key := caddy.NewReplacer().ReplaceKnown(j.Key, "")
	if strings.TrimSpace(key) == "" {
		// Most likely an unset environment variable: refuse rather than
		// verify with an empty secret.
		return fmt.Errorf("jwt: key: '%s' expands to nothing", j.Key)
	}
	var err error
	if j.key, err = loadJWTKey(j.alg, key); err != nil {
		return fmt.Errorf("jwt: key: %w", err)
	}
	opts := []jwt.ParserOption{
		jwt.WithValidMethods([]string{j.alg}),
		jwt.WithLeeway(jwtLeeway),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
	}
	if j.Issuer != "" {
		opts = append(opts, jwt.WithIssuer(j.Issuer))
	}
	if j.Audience != "" {
		opts = append(opts, jwt.WithAudience(j.Audience))
	}
	j.parser = jwt.NewParser(opts...)
	return nil
}

// loadJWTKey turns the expanded key option into the verification key of alg.
func loadJWTKey(alg, key string) (any, error) {
	if alg == "HS256" {
		if len(key) < minHMACKey {
			return nil, fmt.Errorf("an HS256 secret must be at least %d bytes, got %d", minHMACKey, len(key))
		}
		return []byte(key), nil
	}
	pemText := []byte(key)
	if !strings.Contains(key, "-----BEGIN") {
		b, err := readKeyFile(key)
		if err != nil {
			return nil, err
		}
		pemText = b
	}
	switch alg {
	case "RS256":
		pub, err := jwt.ParseRSAPublicKeyFromPEM(pemText)
		if err != nil {
			return nil, fmt.Errorf("want an RSA public key in PEM: %w", err)
		}
		if pub.N.BitLen() < minRSABits {
			return nil, fmt.Errorf("RSA key of %d bits: at least %d are needed", pub.N.BitLen(), minRSABits)
		}
		return pub, nil
	case "ES256":
		pub, err := jwt.ParseECPublicKeyFromPEM(pemText)
		if err != nil {
			return nil, fmt.Errorf("want an ECDSA public key in PEM: %w", err)
		}
		if pub.Curve != elliptic.P256() {
			return nil, fmt.Errorf("ES256 needs a P-256 key, got %s", pub.Curve.Params().Name)
		}
		return pub, nil
	}
	return nil, fmt.Errorf("unsupported alg %s", alg)
}

func readKeyFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxKeyFile+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxKeyFile {
		return nil, fmt.Errorf("%s: larger than %d bytes: not a key file", path, maxKeyFile)
	}
	return b, nil
}

// grant is what authentication established about a request: the channel
// patterns its token allows. nil when the handler needs no token.
type grant struct {
	patterns []string
	expires  time.Time // the token's exp: the stream ends by then
}

// authenticate checks the request's token, if the handler wants one, and
// sets {sse.jwt.sub} for the channel templates. It returns 0 to go on, or
// 401 and a short reason.
func (h *Handler) authenticate(r *http.Request, repl *caddy.Replacer) (*grant, int, string) {
	j := h.JWT
	if j == nil {
		return nil, 0, ""
	}
	raw := j.token(r)
	if raw == "" {
		return nil, http.StatusUnauthorized, "missing token"
	}
	if len(raw) > maxTokenLen {
		return nil, http.StatusUnauthorized, "invalid token"
	}
	claims := jwt.MapClaims{}
	if _, err := j.parser.ParseWithClaims(raw, claims, j.keyFunc); err != nil {
		reason := "invalid token"
		switch {
		case errors.Is(err, jwt.ErrTokenExpired):
			reason = "token expired"
		case errors.Is(err, jwt.ErrTokenNotValidYet):
			reason = "token not valid yet"
		}
		if ce := h.logger.Check(zap.DebugLevel, "token refused"); ce != nil {
			ce.Write(zap.Error(err))
		}
		return nil, http.StatusUnauthorized, reason
	}
	g := &grant{patterns: claimStrings(claims[j.claim])}
	if exp, _ := claims.GetExpirationTime(); exp != nil {
		g.expires = exp.Time
	}
	if !g.expires.After(time.Now()) {
		// Within the clock-skew leeway the token is valid, but a stream
		// on it would end at once (streams end at exp) and the client
		// would reconnect with it again and again: ask for a fresh one.
		return nil, http.StatusUnauthorized, "token expired"
	}
	if sub, _ := claims.GetSubject(); sub != "" && repl != nil {
		repl.Set("sse.jwt.sub", sub)
	}
	return g, 0, ""
}

func (j *JWTConfig) keyFunc(*jwt.Token) (any, error) { return j.key, nil }

// token returns the token from the first configured place holding one.
func (j *JWTConfig) token(r *http.Request) string {
	for _, s := range j.from {
		var v string
		switch {
		case s.Header != "":
			v = bearer(r.Header.Get(s.Header), strings.EqualFold(s.Header, "Authorization"))
		case s.Cookie != "":
			if c, err := r.Cookie(s.Cookie); err == nil {
				v = c.Value
			}
		case s.Query != "":
			v = r.URL.Query().Get(s.Query)
		}
		if v = strings.TrimSpace(v); v != "" {
			return v
		}
	}
	return ""
}

// bearer extracts the token of a header value "Bearer <token>". Another
// scheme (Basic, for basic_auth) holds no token. Outside Authorization a
// bare value is the token.
func bearer(v string, schemeRequired bool) string {
	v = strings.TrimSpace(v)
	scheme, rest, found := strings.Cut(v, " ")
	switch {
	case found && strings.EqualFold(scheme, "Bearer"):
		return rest
	case found || schemeRequired:
		return ""
	}
	return v
}

// claimStrings reads a channels claim: one string or an array of them;
// anything else grants nothing.
func claimStrings(v any) []string {
	switch v := v.(type) {
	case string:
		return []string{v}
	case []any:
		out := make([]string, 0, len(v))
		for _, e := range v {
			if s, ok := e.(string); ok {
				out = append(out, s)
			}
		}
		return out
	}
	return nil
}

// authorize checks that the authenticated request may subscribe to every
// one of channels. It returns 0 to admit, or 403 and a short reason.
func (h *Handler) authorize(g *grant, channels []string) (int, string) {
	if h.JWT == nil {
		return 0, ""
	}
	for _, c := range channels {
		if !g.covers(c) {
			return http.StatusForbidden, "token does not grant channel"
		}
	}
	return 0, ""
}

func (g *grant) covers(channel string) bool {
	if g == nil {
		return false
	}
	for _, p := range g.patterns {
		if wildcardMatch(p, channel) {
			return true
		}
	}
	return false
}

// wildcardMatch reports whether s matches pattern, in which `*` stands for
// any run of characters (possibly empty) and everything else for itself.
// It backtracks only to the last star, so it runs in O(len(p)*len(s)) at
// worst, whatever the pattern.
func wildcardMatch(p, s string) bool {
	px, sx := 0, 0
	starPx, starSx := -1, 0
	for px < len(p) || sx < len(s) {
		if px < len(p) {
			switch c := p[px]; {
			case c == '*':
				starPx, starSx = px, sx
				px++
				continue
			case sx < len(s) && s[sx] == c:
				px++
				sx++
				continue
			}
		}
		// Mismatch: let the last star swallow one more character.
		if starPx >= 0 && starSx < len(s) {
			starSx++
			px, sx = starPx+1, starSx
			continue
		}
		return false
	}
	return true
}

// refuseAuth answers an authentication (401) or authorization (403)
// failure; a 401 says how to authenticate (RFC 6750).
func (h *Handler) refuseAuth(w http.ResponseWriter, status int, reason string) error {
	if ce := h.logger.Check(zap.DebugLevel, "stream unauthorized"); ce != nil {
		ce.Write(zap.Int("status", status), zap.String("reason", reason))
	}
	switch {
	case status == http.StatusUnauthorized && reason == "missing token":
		w.Header().Set("WWW-Authenticate", `Bearer realm="sse"`)
	case status == http.StatusUnauthorized:
		w.Header().Set("WWW-Authenticate", `Bearer realm="sse", error="invalid_token"`)
	case status == http.StatusForbidden && h.JWT != nil:
		w.Header().Set("WWW-Authenticate", `Bearer realm="sse", error="insufficient_scope"`)
	}
	return refuse(w, status, "auth", reason)
}

// Package auth verifies the JSON Web Tokens that admit event streams and
// checks that a token grants every channel of its stream. It knows nothing
// of Caddy: the caller expands placeholders in the key before New sees it.
package auth

import (
	"crypto/elliptic"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// Defaults and limits.
const (
	// DefaultAlg is the signing algorithm accepted when none is named.
	DefaultAlg = "HS256"
	// DefaultClaim is the claim read for the granted channels.
	DefaultClaim = "channels"
	// DefaultTokenName is the cookie and query parameter looked at by
	// default, the query parameter name of RFC 6750.
	DefaultTokenName = "access_token"
	// MinHMACKey is RFC 7518's minimum for HS256: the hash's size.
	MinHMACKey = 32
	// Leeway absorbs clock skew between the token issuer and this server.
	Leeway = 30 * time.Second
	// MaxTokenLen refuses oversized tokens before any parsing.
	MaxTokenLen = 16 << 10
	// maxKeyFile bounds the read of a key file (a path such as /dev/zero
	// must not hang the config load).
	maxKeyFile = 1 << 20
	// minRSABits refuses keys that are too weak to trust.
	minRSABits = 2048
)

// Algs are the accepted values of Options.Alg.
var Algs = []string{"HS256", "RS256", "ES256"}

// Reasons a request is refused, as told to the client.
const (
	ReasonMissing     = "missing token"
	ReasonInvalid     = "invalid token"
	ReasonExpired     = "token expired"
	ReasonNotYetValid = "token not valid yet"
	ReasonNotGranted  = "token does not grant channel"
)

// Source is one place a token may be found; exactly one field is set.
type Source struct {
	// Header names a request header. In Authorization the token must follow
	// the Bearer scheme; in any other header a "Bearer " prefix is optional.
	Header string `json:"header,omitempty"`
	// Cookie names a cookie holding the token.
	Cookie string `json:"cookie,omitempty"`
	// Query names a query parameter holding the token.
	Query string `json:"query,omitempty"`
}

// Check reports a source that does not name exactly one place.
func (s Source) Check() error {
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

// DefaultSources are where a token is looked for when no source is named:
// the Authorization header (Bearer scheme), the access_token cookie, then
// the access_token query parameter (EventSource cannot set headers).
func DefaultSources() []Source {
	return []Source{
		{Header: "Authorization"},
		{Cookie: DefaultTokenName},
		{Query: DefaultTokenName},
	}
}

// Options configure a Verifier. Errors about them start with the option's
// name (alg, key, from), for the caller to prefix with its own.
type Options struct {
	// Alg is the one signing algorithm accepted; empty means DefaultAlg.
	Alg string
	// Key is the HS256 secret, or for RS256 and ES256 the path of a PEM
	// file holding the public key (or a certificate), or the PEM text.
	Key string
	// From lists where the token is looked for, in order; empty means
	// DefaultSources.
	From []Source
	// Claim names the claim listing the granted channels; empty means
	// DefaultClaim.
	Claim string
	// Issuer and Audience, when set, must match the token's iss and aud.
	Issuer, Audience string
}

// Check checks what can be checked without reading keys.
func (o Options) Check() error {
	alg := o.alg()
	if !slices.Contains(Algs, alg) {
		return fmt.Errorf("alg: want one of %s, got '%s'", strings.Join(Algs, ", "), o.Alg)
	}
	if strings.TrimSpace(o.Key) == "" {
		return errors.New("key: required")
	}
	for _, s := range o.From {
		if err := s.Check(); err != nil {
			return fmt.Errorf("from: %w", err)
		}
	}
	return nil
}

func (o Options) alg() string {
	if o.Alg == "" {
		return DefaultAlg
	}
	return o.Alg
}

// Verifier checks tokens against one key.
type Verifier struct {
	key    any // []byte, *rsa.PublicKey or *ecdsa.PublicKey, by alg
	from   []Source
	claim  string
	parser *jwt.Parser
}

// New loads the key (reading the key file) and builds the verifier.
func New(o Options) (*Verifier, error) {
	if err := o.Check(); err != nil {
		return nil, err
	}
	alg := o.alg()
	key, err := loadKey(alg, o.Key)
	if err != nil {
		return nil, fmt.Errorf("key: %w", err)
	}
	v := &Verifier{key: key, from: o.From, claim: o.Claim}
	if len(v.from) == 0 {
		v.from = DefaultSources()
	}
	if v.claim == "" {
		v.claim = DefaultClaim
	}
	opts := []jwt.ParserOption{
		jwt.WithValidMethods([]string{alg}),
		jwt.WithLeeway(Leeway),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
	}
	if o.Issuer != "" {
		opts = append(opts, jwt.WithIssuer(o.Issuer))
	}
	if o.Audience != "" {
		opts = append(opts, jwt.WithAudience(o.Audience))
	}
	v.parser = jwt.NewParser(opts...)
	return v, nil
}

// loadKey turns the key option into the verification key of alg.
func loadKey(alg, key string) (any, error) {
	if alg == "HS256" {
		if len(key) < MinHMACKey {
			return nil, fmt.Errorf("an HS256 secret must be at least %d bytes, got %d", MinHMACKey, len(key))
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

// Grant is what a valid token establishes: who, which channels, until when.
type Grant struct {
	// Subject is the token's sub claim, empty if it has none.
	Subject string
	// Expires is the token's exp: a stream it admitted ends by then.
	Expires time.Time
	// Patterns are the granted channels, `*` standing for any run of
	// characters.
	Patterns []string
}

// Refusal is why a request is refused: 401 for a missing or invalid token,
// 403 for a channel the token does not grant.
type Refusal struct {
	Status int
	Reason string // one of the Reason constants, for the client
	Err    error  // the verification error behind Reason, if any, for logs
}

func (r *Refusal) Error() string { return r.Reason }

func (r *Refusal) Unwrap() error { return r.Err }

// Challenge is the WWW-Authenticate value for the refusal (RFC 6750).
func (r *Refusal) Challenge() string {
	switch {
	case r.Status == http.StatusUnauthorized && r.Reason == ReasonMissing:
		return `Bearer realm="sse"`
	case r.Status == http.StatusUnauthorized:
		return `Bearer realm="sse", error="invalid_token"`
	case r.Status == http.StatusForbidden:
		return `Bearer realm="sse", error="insufficient_scope"`
	}
	return ""
}

func unauthorized(reason string, err error) *Refusal {
	return &Refusal{Status: http.StatusUnauthorized, Reason: reason, Err: err}
}

// Verify checks the request's token and returns its grant, or why the
// request is refused.
func (v *Verifier) Verify(r *http.Request) (*Grant, *Refusal) {
	raw := v.token(r)
	if raw == "" {
		return nil, unauthorized(ReasonMissing, nil)
	}
	if len(raw) > MaxTokenLen {
		return nil, unauthorized(ReasonInvalid, nil)
	}
	claims := jwt.MapClaims{}
	if _, err := v.parser.ParseWithClaims(raw, claims, v.keyFunc); err != nil {
		reason := ReasonInvalid
		switch {
		case errors.Is(err, jwt.ErrTokenExpired):
			reason = ReasonExpired
		case errors.Is(err, jwt.ErrTokenNotValidYet):
			reason = ReasonNotYetValid
		}
		return nil, unauthorized(reason, err)
	}
	g := &Grant{Patterns: claimStrings(claims[v.claim])}
	if exp, _ := claims.GetExpirationTime(); exp != nil {
		g.Expires = exp.Time
	}
	if !g.Expires.After(time.Now()) {
		// Within the clock-skew leeway the token is valid, but a stream
		// on it would end at once (streams end at exp) and the client
		// would reconnect with it again and again: ask for a fresh one.
		return nil, unauthorized(ReasonExpired, nil)
	}
	g.Subject, _ = claims.GetSubject()
	return g, nil
}

func (v *Verifier) keyFunc(*jwt.Token) (any, error) { return v.key, nil }

// token returns the token from the first configured place holding one.
func (v *Verifier) token(r *http.Request) string {
	for _, s := range v.from {
		var t string
		switch {
		case s.Header != "":
			t = Bearer(r.Header.Get(s.Header), strings.EqualFold(s.Header, "Authorization"))
		case s.Cookie != "":
			if c, err := r.Cookie(s.Cookie); err == nil {
				t = c.Value
			}
		case s.Query != "":
			t = r.URL.Query().Get(s.Query)
		}
		if t = strings.TrimSpace(t); t != "" {
			return t
		}
	}
	return ""
}

// Bearer extracts the token of a header value "Bearer <token>". Another
// scheme (Basic, for basic_auth) holds no token. With schemeRequired unset
// (outside Authorization) a bare value is the token.
func Bearer(v string, schemeRequired bool) string {
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

// Authorize checks that g grants every one of channels; a nil grant grants
// nothing.
func (g *Grant) Authorize(channels []string) *Refusal {
	for _, c := range channels {
		if !g.Covers(c) {
			return &Refusal{Status: http.StatusForbidden, Reason: ReasonNotGranted}
		}
	}
	return nil
}

// Covers reports whether g grants channel.
func (g *Grant) Covers(channel string) bool {
	if g == nil {
		return false
	}
	for _, p := range g.Patterns {
		if Match(p, channel) {
			return true
		}
	}
	return false
}

// Match reports whether s matches pattern, in which `*` stands for any run
// of characters (possibly empty) and everything else for itself. It
// backtracks only to the last star, so it runs in O(len(p)*len(s)) at
// worst, whatever the pattern.
func Match(p, s string) bool {
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

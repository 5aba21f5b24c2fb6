package caddysse

// This file wires the `jwt` option to auth/: the config, the key's
// placeholders (expanded here, at load time) and the placeholders a token
// sets for the channel templates.

import (
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-sse/caddy-sse/auth"
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

	verifier *auth.Verifier
}

// JWTSource is one place a token may be found; exactly one field is set.
type JWTSource = auth.Source

// options are the config as auth/ takes it, with key as given.
func (j *JWTConfig) options(key string) auth.Options {
	return auth.Options{Alg: j.Alg, Key: key, From: j.From, Claim: j.Claim,
		Issuer: j.Issuer, Audience: j.Audience}
}

// validate checks what can be checked without reading keys; every error
// names the option.
func (j *JWTConfig) validate() error {
	if j == nil {
		return nil
	}
	if err := j.options(j.Key).Check(); err != nil {
		return fmt.Errorf("jwt: %w", err)
	}
	return nil
}

// compile expands the key's placeholders, loads the key (reading the key
// file) and builds the verifier. It runs at provision.
func (j *JWTConfig) compile() error {
	if err := j.validate(); err != nil {
		return err
	}
	key := caddy.NewReplacer().ReplaceKnown(j.Key, "")
	if strings.TrimSpace(key) == "" {
		// Most likely an unset environment variable: refuse rather than
		// verify with an empty secret.
		return fmt.Errorf("jwt: key: '%s' expands to nothing", j.Key)
	}
	v, err := auth.New(j.options(key))
	if err != nil {
		return fmt.Errorf("jwt: %w", err)
	}
	j.verifier = v
	return nil
}

// grant is what authentication established about a request: nil when the
// handler needs no token.
type grant struct {
	token   *auth.Grant
	expires time.Time // the token's exp: the stream ends by then
}

// Placeholders a valid token sets, for the channel templates and the
// handlers after this one. The names without the http. prefix are the
// module's first ones, kept as aliases.
const (
	placeholderJWTSub    = "http.sse.jwt.sub"
	placeholderJWTSubOld = "sse.jwt.sub"
)

// authenticate checks the request's token, if the handler wants one, and
// sets {http.sse.jwt.sub} for the channel templates. It returns 0 to go on,
// or 401 and a short reason.
func (h *Handler) authenticate(r *http.Request, repl *caddy.Replacer) (*grant, int, string) {
	if h.JWT == nil {
		return nil, 0, ""
	}
	g, refusal := h.JWT.verifier.Verify(r)
	if refusal != nil {
		if refusal.Err != nil {
			if ce := h.logger.Check(zap.DebugLevel, "token refused"); ce != nil {
				ce.Write(zap.Error(refusal.Err))
			}
		}
		return nil, refusal.Status, refusal.Reason
	}
	if g.Subject != "" && repl != nil {
		repl.Set(placeholderJWTSub, g.Subject)
		repl.Set(placeholderJWTSubOld, g.Subject)
	}
	return &grant{token: g, expires: g.Expires}, 0, ""
}

// authorize checks that the authenticated request may subscribe to every
// one of channels. It returns 0 to admit, or 403 and a short reason.
func (h *Handler) authorize(g *grant, channels []string) (int, string) {
	if h.JWT == nil {
		return 0, ""
	}
	var token *auth.Grant
	if g != nil {
		token = g.token
	}
	if refusal := token.Authorize(channels); refusal != nil {
		return refusal.Status, refusal.Reason
	}
	return 0, ""
}

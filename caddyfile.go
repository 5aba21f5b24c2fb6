package caddysse

// This file registers the `sse` and `sse_publish` Caddyfile directives and
// turns their tokens into the handlers' JSON config. Every value that can be
// checked without Redis or a request is checked here, so that `caddy adapt`
// and `caddy validate` fail on the line at fault, with the option's name.

import (
	"math"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"

	"github.com/caddy-sse/caddy-sse/auth"
	"github.com/caddy-sse/caddy-sse/sse"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("sse", parseSSE)
	httpcaddyfile.RegisterHandlerDirective("sse_publish", parsePublish)
	httpcaddyfile.RegisterHandlerDirective("sse_health", parseHealth)
	// Ordered right after encode (so encode can wrap the stream, and auth
	// directives run first) and so before handle, respond and
	// reverse_proxy: both work in a site block that proxies everything else
	// to the existing app, without a `route` block.
	httpcaddyfile.RegisterDirectiveOrder("sse", httpcaddyfile.After, "encode")
	httpcaddyfile.RegisterDirectiveOrder("sse_publish", httpcaddyfile.After, "encode")
	httpcaddyfile.RegisterDirectiveOrder("sse_health", httpcaddyfile.After, "encode")
}

// parseSSE sets up the `sse` handler from Caddyfile tokens; the matcher has
// already been taken out by RegisterHandlerDirective.
func parseSSE(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	s := new(Handler)
	if err := s.UnmarshalCaddyfile(h.Dispenser); err != nil {
		return nil, err
	}
	return s, nil
}

// parsePublish sets up the `sse_publish` handler from Caddyfile tokens.
func parsePublish(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	p := new(Publish)
	if err := p.UnmarshalCaddyfile(h.Dispenser); err != nil {
		return nil, err
	}
	return p, nil
}

// parseHealth sets up the `sse_health` handler from Caddyfile tokens.
func parseHealth(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	hl := new(Health)
	if err := hl.UnmarshalCaddyfile(h.Dispenser); err != nil {
		return nil, err
	}
	return hl, nil
}

// UnmarshalCaddyfile sets up the sse handler from Caddyfile tokens. Syntax:
//
//	sse [<matcher>] [<channel>...] {
//	    redis   <url>
//	    redis {
//	        addrs       <host:port>...
//	        master_name <name>
//	        cluster
//	        sharded
//	        username    <user>
//	        password    <password>
//	        db          <n>
//	        tls
//	    }
//	    channel <template>...
//	    allow   <regexp>
//	    format  raw|envelope
//	    keepalive <duration>
//	    retry   <duration>
//	    buffer  <n>
//	    history <n> [<ttl>]
//	    last_event_id   <template>
//	    max_connections <n>
//	    max_channels    <n>
//	    max_duration    <duration>
//	    takeover on|off
//	    max_connections_per <template> <n> [reject|evict_oldest]
//	    presence  <identity-template> [<ttl>]
//	    lifecycle <stream-key> [<maxlen>]
//	    jwt {
//	        key      <secret>|<PEM file>
//	        alg      HS256|RS256|ES256
//	        from     header [<name>] | cookie <name> | query <name>
//	        claim    <name>
//	        issuer   <iss>
//	        audience <aud>
//	    }
//	}
//
// Channels given on the directive's line and on `channel` lines (which may
// repeat) are all subscribed; at least one is required. Channel templates
// may hold placeholders, expanded per request, and a value with commas
// becomes several channels. A channel given on the directive's line must not
// start with `/` or `@`, or be `*`, which Caddy reads as a matcher.
//
// `redis` takes a redis:// or rediss:// URL, or a placeholder such as
// {env.REDIS_URL}, or a block, not both: `addrs` for one server, the
// Sentinels (with `master_name`) or the Cluster nodes (with `cluster`, and
// `sharded` for sharded pub/sub and per-channel history on each master); a
// block without `addrs` sets `username`, `password` and `tls` for the
// default server (`db` then belongs in the URL's path). Without `redis`,
// {env.REDIS_URL} and then redis://127.0.0.1:6379 are used.
//
// Integers must not be negative and durations are Caddy durations (such as
// 30s, 1h or 1d). `history` keeps <n> (at least 1) events per channel for
// Last-Event-ID resume, dropped after <ttl> without a publish if given.
// `takeover` (on by default) writes HTTP/1.x streams directly on their
// connection once admitted, releasing the request's goroutine and buffers;
// `takeover off` keeps them on Caddy's response writer (through encode).
//
// `last_event_id` is the resume point (a placeholder template, such as
// {rp.header.X-Sse-Last-Event-Id} in handle_response) of a stream whose
// client sent no Last-Event-ID. Options other than `channel` may appear once.
//
// `max_connections_per` allows at most <n> concurrent streams per value of
// <template> (expanded per request; an empty value is not limited); past it
// `reject` (the default) answers 429 and `evict_oldest` ends the oldest
// stream of that value.
//
// `presence` counts each stream, per channel, under its identity (the
// template expanded per request; empty means anonymous, not counted) in
// Redis, for FCALL sse_presence; <ttl> (at least 3s, default 30s) bounds
// how long a killed instance keeps counting. `lifecycle` appends an entry
// to the Redis stream <stream-key> (capped at about <maxlen> entries,
// default 10000) when a stream opens and when it ends.
//
// `jwt` requires a JSON Web Token: `key` is the HS256 secret (placeholders
// such as {env.SSE_JWT_SECRET} are expanded at load time) or, for RS256 and
// ES256, a PEM file with the public key; `alg` defaults to HS256; `from`
// lines (repeatable, tried in order) say where the token is, by default the
// Authorization header (Bearer), then the access_token cookie, then the
// access_token query parameter; `claim` (default channels) lists the
// channels the token grants, `*` matching any run of characters; `issuer`
// and `audience`, when given, must match the token's iss and aud.
func (s *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name

	// `sse <channel>...` is the shorthand for the common one-line case.
	s.Channels = append(s.Channels, d.RemainingArgs()...)

	seen := make(map[string]bool)
	for d.NextBlock(0) {
		if err := once(d, seen, "", "channel"); err != nil {
			return err
		}
		if err := s.unmarshalOption(d); err != nil {
			return err
		}
	}

	if len(s.Channels) == 0 {
		// A lone `sse /events` lands here too: Caddy took /events for a
		// path matcher, hence the hint.
		return d.Err("channel: sse needs at least one channel, as `sse [<matcher>] <channel>` or `channel <template>` in its block (a first argument starting with / or @, or *, is a matcher)")
	}
	for _, c := range s.Channels {
		// Only possible with a quoted "", but it would subscribe nothing.
		if strings.TrimSpace(c) == "" {
			return d.Err("channel: empty channel template")
		}
	}
	return nil
}

// unmarshalOption reads one option of the sse block, whose name is the
// current token.
func (s *Handler) unmarshalOption(d *caddyfile.Dispenser) error {
	var err error
	switch opt := d.Val(); opt {
	case "redis":
		s.Redis, err = parseRedis(d)
	case "channel":
		var channels []string
		channels, err = optArgs(d, opt, 1, -1)
		s.Channels = append(s.Channels, channels...)
	case "allow":
		s.Allow, err = parseAllow(d)
	case "format":
		s.Format, err = parseFormat(d)

	case "keepalive":
		s.Keepalive, err = optDuration(d, opt)
	case "retry":
		s.Retry, err = optDuration(d, opt)
	case "max_duration":
		s.MaxDuration, err = optDuration(d, opt)

	case "buffer":
		s.Buffer, err = optInt(d, opt)
	case "max_connections":
		s.MaxConnections, err = optInt(d, opt)
	case "max_channels":
		s.MaxChannels, err = optInt(d, opt)

	case "history":
		s.History, err = parseHistory(d)
	case "last_event_id":
		s.LastEventID, err = optArg(d, opt)
	case "takeover":
		s.Takeover, err = parseTakeover(d)
	case "max_connections_per":
		s.MaxConnectionsPer, err = parseConnectionLimit(d)
	case "jwt":
		s.JWT, err = parseJWT(d)
	case "presence":
		s.Presence, err = parsePresence(d)
	case "lifecycle":
		s.Lifecycle, err = parseLifecycle(d)
	default:
		return d.Errf("unrecognized sse option '%s'", opt)
	}
	return err
}

// parseAllow reads `allow <regexp>`, whose name is the current token.
func parseAllow(d *caddyfile.Dispenser) (string, error) {
	arg, err := optArg(d, "allow")
	if err != nil {
		return "", err
	}
	// Compiled alone for an error message about the operator's own text,
	// then anchored as Provision compiles it, so that adapt fails on
	// exactly the expressions that would fail at load time.
	if _, err := regexp.Compile(arg); err != nil {
		return "", d.Errf("allow: invalid regular expression: %v", err)
	}
	if _, err := regexp.Compile(`^(?:` + arg + `)$`); err != nil {
		return "", d.Errf("allow: invalid regular expression: %v", err)
	}
	return arg, nil
}

// parseFormat reads `format raw|envelope`, whose name is the current token.
func parseFormat(d *caddyfile.Dispenser) (string, error) {
	arg, err := optArg(d, "format")
	if err != nil {
		return "", err
	}
	f, err := sse.ParseFormat(arg)
	if err != nil || arg == "" {
		return "", d.Errf("format: want raw or envelope, got '%s'", arg)
	}
	return f.String(), nil
}

// parseTakeover reads `takeover on|off`, whose name is the current token.
// The result is a pointer because unset means on.
func parseTakeover(d *caddyfile.Dispenser) (*bool, error) {
	arg, err := optArg(d, "takeover")
	if err != nil {
		return nil, err
	}
	var on bool
	switch arg {
	case "on":
		on = true
	case "off":
		on = false
	default:
		return nil, d.Errf("takeover: want on or off, got '%s'", arg)
	}
	return &on, nil
}

// UnmarshalCaddyfile sets up the sse_publish handler from Caddyfile tokens.
// Syntax:
//
//	sse_publish [<matcher>] [<channel>] {
//	    redis    <url> | { ... }
//	    channel  <template>
//	    history  <n> [<ttl>]
//	    max_size <bytes>
//	}
//
// Exactly one channel template is required, on the directive's line or as
// `channel`; placeholders in it are expanded per request. `redis` and
// `history` are as in `sse`. `max_size` takes a number of bytes or a size
// such as 64KiB or 1MB; larger bodies get 413. Each option may appear once.
func (p *Publish) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name

	// `sse_publish <channel>` mirrors the `sse <channel>` shorthand.
	switch args := d.RemainingArgs(); len(args) {
	case 0:
	case 1:
		p.Channel = args[0]
	default:
		return errOneChannel(d, len(args))
	}

	seen := make(map[string]bool)
	for d.NextBlock(0) {
		if err := once(d, seen, ""); err != nil {
			return err
		}
		var err error
		switch opt := d.Val(); opt {
		case "redis":
			p.Redis, err = parseRedis(d)
		case "channel":
			err = p.unmarshalChannel(d)
		case "history":
			p.History, err = parseHistory(d)
		case "max_size":
			p.MaxSize, err = optSize(d, opt)
		default:
			return d.Errf("unrecognized sse_publish option '%s'", opt)
		}
		if err != nil {
			return err
		}
	}

	if strings.TrimSpace(p.Channel) == "" {
		return d.Err("channel: sse_publish needs a channel template, as `sse_publish <channel>` or `channel <template>` in its block")
	}
	return nil
}

// unmarshalChannel reads the `channel` option of the sse_publish block,
// whose name is the current token.
func (p *Publish) unmarshalChannel(d *caddyfile.Dispenser) error {
	if p.Channel != "" {
		return d.Err("channel: sse_publish publishes to exactly one channel, already given on the directive's line")
	}
	args, err := optArgs(d, "channel", 1, -1)
	if err != nil {
		return err
	}
	if len(args) > 1 {
		return errOneChannel(d, len(args))
	}
	p.Channel = args[0]
	return nil
}

// errOneChannel refuses the n channel templates given to sse_publish, on
// its line or in its `channel` option.
func errOneChannel(d *caddyfile.Dispenser, n int) error {
	return d.Errf("channel: sse_publish publishes to exactly one channel, got %d", n)
}

// parsePresence reads `presence <identity-template> [<ttl>]`, whose name is
// the current token.
func parsePresence(d *caddyfile.Dispenser) (*Presence, error) {
	const opt = "presence"
	args, err := optArgs(d, opt, 1, 2)
	if err != nil {
		return nil, err
	}
	p := &Presence{Identity: args[0]}
	if len(args) == 2 {
		ttl, err := caddy.ParseDuration(args[1])
		if err != nil {
			return nil, d.Errf("%s: ttl: %v", opt, err)
		}
		if ttl <= 0 {
			return nil, d.Errf("%s: ttl must be positive, got '%s'", opt, args[1])
		}
		p.TTL = caddy.Duration(ttl)
	}
	if err := p.validate(); err != nil {
		return nil, d.Err(err.Error())
	}
	return p, nil
}

// parseLifecycle reads `lifecycle <stream-key> [<maxlen>]`, whose name is
// the current token.
func parseLifecycle(d *caddyfile.Dispenser) (*Lifecycle, error) {
	const opt = "lifecycle"
	args, err := optArgs(d, opt, 1, 2)
	if err != nil {
		return nil, err
	}
	l := &Lifecycle{Stream: args[0]}
	if len(args) == 2 {
		n, err := strconv.Atoi(args[1])
		if err != nil || n < 1 {
			return nil, d.Errf("%s: maxlen must be a positive integer, got '%s'", opt, args[1])
		}
		l.MaxLen = n
	}
	if err := l.validate(); err != nil {
		return nil, d.Err(err.Error())
	}
	return l, nil
}

// UnmarshalCaddyfile sets up the sse_health handler from Caddyfile tokens.
// Syntax:
//
//	sse_health [<matcher>] {
//	    redis <url> | { ... }
//	}
//
// `redis` is as in `sse` (the same default); the block may be left out.
func (hl *Health) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.Errf("sse_health: takes no arguments besides a matcher, got '%s'", d.Val())
	}
	seen := make(map[string]bool)
	for d.NextBlock(0) {
		if err := once(d, seen, ""); err != nil {
			return err
		}
		switch opt := d.Val(); opt {
		case "redis":
			var err error
			if hl.Redis, err = parseRedis(d); err != nil {
				return err
			}
		default:
			return d.Errf("unrecognized sse_health option '%s'", opt)
		}
	}
	return nil
}

// parseConnectionLimit reads `max_connections_per <template> <n>
// [reject|evict_oldest]`, whose name is the current token.
func parseConnectionLimit(d *caddyfile.Dispenser) (*ConnectionLimit, error) {
	const opt = "max_connections_per"
	args, err := optArgs(d, opt, 2, 3)
	if err != nil {
		return nil, err
	}
	l := &ConnectionLimit{Key: args[0]}
	if strings.TrimSpace(l.Key) == "" {
		return nil, d.Errf("%s: empty key template", opt)
	}
	n, err := strconv.Atoi(args[1])
	if err != nil || n < 1 {
		return nil, d.Errf("%s: want a positive number of streams, got '%s'", opt, args[1])
	}
	l.Max = n
	if len(args) == 3 {
		switch args[2] {
		case policyReject, policyEvictOldest:
			l.Policy = args[2]
		default:
			return nil, d.Errf("%s: want reject or evict_oldest, got '%s'", opt, args[2])
		}
	}
	return l, nil
}

// parseJWT reads the `jwt` block, whose name is the current token.
func parseJWT(d *caddyfile.Dispenser) (*JWTConfig, error) {
	if d.NextArg() {
		return nil, d.Errf("jwt: takes a block, not arguments ('%s')", d.Val())
	}
	j := new(JWTConfig)
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if err := once(d, seen, "jwt: ", "from"); err != nil {
			return nil, err
		}
		if err := j.unmarshalOption(d); err != nil {
			return nil, err
		}
	}
	// Also the error for `jwt` without a block, or with an empty one.
	if j.Key == "" {
		return nil, d.Err("jwt: key: required, as `key <secret>` or `key <PEM file>` in the jwt block")
	}
	if err := j.validate(); err != nil {
		return nil, d.Err(err.Error())
	}
	// A literal secret can be checked now; a placeholder only at load time.
	if (j.Alg == "" || j.Alg == "HS256") && !strings.Contains(j.Key, "{") && len(j.Key) < auth.MinHMACKey {
		return nil, d.Errf("jwt: key: an HS256 secret must be at least %d bytes, got %d", auth.MinHMACKey, len(j.Key))
	}
	return j, nil
}

// unmarshalOption reads one option of the jwt block, whose name is the
// current token.
func (j *JWTConfig) unmarshalOption(d *caddyfile.Dispenser) error {
	var err error
	switch opt := d.Val(); opt {
	case "key":
		j.Key, err = optArg(d, "jwt: key")
	case "alg":
		j.Alg, err = parseJWTAlg(d)
	case "from":
		var src JWTSource
		if src, err = parseJWTSource(d); err == nil {
			j.From = append(j.From, src)
		}
	case "claim":
		j.Claim, err = optArg(d, "jwt: claim")
	case "issuer":
		j.Issuer, err = optArg(d, "jwt: issuer")
	case "audience":
		j.Audience, err = optArg(d, "jwt: audience")
	default:
		return d.Errf("jwt: unrecognized option '%s'", opt)
	}
	return err
}

// parseJWTAlg reads `alg <name>` in the jwt block, whose name is the
// current token.
func parseJWTAlg(d *caddyfile.Dispenser) (string, error) {
	alg, err := optArg(d, "jwt: alg")
	if err != nil {
		return "", err
	}
	if !slices.Contains(auth.Algs, alg) {
		return "", d.Errf("jwt: alg: want one of %s, got '%s'", strings.Join(auth.Algs, ", "), alg)
	}
	return alg, nil
}

// parseJWTSource reads `from header [<name>] | cookie <name> | query
// <name>` in the jwt block, whose name is the current token.
func parseJWTSource(d *caddyfile.Dispenser) (JWTSource, error) {
	var src JWTSource
	args, err := optArgs(d, "jwt: from", 1, 2)
	if err != nil {
		return src, err
	}
	switch {
	case args[0] == "header" && len(args) == 1:
		src.Header = "Authorization"
	case args[0] == "header":
		src.Header = args[1]
	case args[0] == "cookie" && len(args) == 2:
		src.Cookie = args[1]
	case args[0] == "query" && len(args) == 2:
		src.Query = args[1]
	default:
		return src, d.Errf("jwt: from: want header [<name>], cookie <name> or query <name>, got '%s'", strings.Join(args, " "))
	}
	return src, nil
}

// once refuses an option given a second time in one block, whose value
// would silently replace the first, unless it is one of repeatable, whose
// values add up. seen holds the options given so far in the block; prefix
// names the enclosing option in the error, as "jwt: ".
func once(d *caddyfile.Dispenser, seen map[string]bool, prefix string, repeatable ...string) error {
	opt := d.Val()
	if seen[opt] && !slices.Contains(repeatable, opt) {
		return d.Errf("%s%s: specified more than once", prefix, opt)
	}
	seen[opt] = true
	return nil
}

// optArgs returns the arguments of the option whose name is the current
// token, between least and most of them (most < 0: no limit). An option that
// takes no block must not be followed by one: the tokens in it would
// otherwise be read as options of the enclosing block.
func optArgs(d *caddyfile.Dispenser, opt string, least, most int) ([]string, error) {
	args := d.RemainingArgs()
	switch {
	case len(args) != least && least == most:
		return nil, d.Errf("%s: want %d argument(s), got %d", opt, least, len(args))
	case len(args) < least:
		return nil, d.Errf("%s: want at least %d argument(s), got %d", opt, least, len(args))
	case most >= 0 && len(args) > most:
		return nil, d.Errf("%s: want at most %d argument(s), got %d", opt, most, len(args))
	}
	if d.NextBlock(d.Nesting()) {
		return nil, d.Errf("%s: takes no block", opt)
	}
	return args, nil
}

// optArg returns the single argument of the current option.
func optArg(d *caddyfile.Dispenser, opt string) (string, error) {
	args, err := optArgs(d, opt, 1, 1)
	if err != nil {
		return "", err
	}
	return args[0], nil
}

// optInt returns the current option's single argument as a non-negative
// integer.
func optInt(d *caddyfile.Dispenser, opt string) (int, error) {
	arg, err := optArg(d, opt)
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(arg)
	if err != nil {
		return 0, d.Errf("%s: want a non-negative integer, got '%s'", opt, arg)
	}
	if n < 0 {
		return 0, d.Errf("%s: must not be negative, got %d", opt, n)
	}
	return n, nil
}

// optDuration returns the current option's single argument as a
// non-negative duration.
func optDuration(d *caddyfile.Dispenser, opt string) (caddy.Duration, error) {
	arg, err := optArg(d, opt)
	if err != nil {
		return 0, err
	}
	dur, err := caddy.ParseDuration(arg)
	if err != nil {
		return 0, d.Errf("%s: %v", opt, err)
	}
	if dur < 0 {
		return 0, d.Errf("%s: must not be negative, got '%s'", opt, arg)
	}
	return caddy.Duration(dur), nil
}

// optSize returns the current option's single argument as a number of
// bytes, given as such or as a size such as 64KiB or 1MB.
func optSize(d *caddyfile.Dispenser, opt string) (int64, error) {
	arg, err := optArg(d, opt)
	if err != nil {
		return 0, err
	}
	size, err := humanize.ParseBytes(arg)
	if err != nil {
		return 0, d.Errf("%s: '%s' is not a size in bytes (such as 65536, 64KiB or 1MB)", opt, arg)
	}
	if size > math.MaxInt64 {
		return 0, d.Errf("%s: '%s' is too large", opt, arg)
	}
	return int64(size), nil
}

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*Handler)(nil)
	_ caddyfile.Unmarshaler = (*Publish)(nil)
	_ caddyfile.Unmarshaler = (*Health)(nil)
)

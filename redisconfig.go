package caddysse

// This file holds everything about which Redis the handlers use and what
// they keep in it: the `redis` and `history` options (JSON and Caddyfile),
// their checks, the go-redis options they become, and the key that shares
// one hub among the configs that name the same Redis. The Caddyfile
// parsers and the handlers' Validate call the same validate methods, so a
// JSON config is held to the Caddyfile's rules.

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/broker"
)

// RedisConfig says how to reach Redis: a URL, or addresses for a single
// server, Sentinel (with MasterName) or Cluster.
type RedisConfig struct {
	// URL is a redis:// or rediss:// URL. Placeholders such as {env.REDIS_URL}
	// are expanded at load time. Not with Addrs.
	URL string `json:"url,omitempty"`
	// Addrs are host:port addresses: one server, the Sentinels (with
	// MasterName), or Cluster nodes.
	Addrs []string `json:"addrs,omitempty"`
	// MasterName selects Sentinel mode: the name of the monitored master.
	// Needs Addrs (the Sentinels); not with Cluster.
	MasterName string `json:"master_name,omitempty"`
	// Cluster selects Redis Cluster mode.
	Cluster bool `json:"cluster,omitempty"`
	// Sharded, with Cluster, uses Redis 7's sharded pub/sub: each channel
	// is subscribed (SSUBSCRIBE) on the master of its slot and its history
	// lives there too, so publish load spreads over the masters. Publishers
	// use SPUBLISH, and FCALL sse_publish with the channel's own history key
	// (sse:h{<channel>}); resume ids count per channel. See the README.
	Sharded bool `json:"sharded,omitempty"`
	// Username for Redis ACL authentication. Placeholders are expanded.
	Username string `json:"username,omitempty"`
	// Password for Redis authentication. Placeholders are expanded.
	Password string `json:"password,omitempty"`
	// DB is the database number. Needs Addrs (with a URL, the database is
	// the URL's path); not in Cluster mode.
	DB int `json:"db,omitempty"`
	// TLS connects with TLS.
	TLS bool `json:"tls,omitempty"`
}

// defaultRedisURL is used when neither the config nor REDIS_URL names one.
const defaultRedisURL = "redis://127.0.0.1:6379"

// validate refuses what go-redis would otherwise settle silently by picking
// a mode or ignoring a field; every error names the option. Values with
// placeholders are checked once expanded, at load time.
func (c *RedisConfig) validate() error {
	if c == nil {
		return nil
	}
	if c.URL != "" {
		if len(c.Addrs) > 0 {
			return errors.New("redis: give either a url or addrs, not both")
		}
		if err := checkRedisURL(c.URL); err != nil {
			return fmt.Errorf("redis: %w", err)
		}
	}
	for _, a := range c.Addrs {
		if err := checkAddr(a); err != nil {
			return fmt.Errorf("redis: addrs: %w", err)
		}
	}
	switch {
	case c.Sharded && !c.Cluster:
		return errors.New("redis: sharded needs cluster (sharded pub/sub exists on a Redis Cluster only: give its nodes in addrs, and cluster)")
	case c.Cluster && c.MasterName != "":
		return errors.New("redis: cluster and master_name exclude each other (Cluster or Sentinel)")
	case c.MasterName != "" && len(c.Addrs) == 0:
		return errors.New("redis: master_name needs the Sentinel addresses in addrs")
	case c.DB < 0:
		return fmt.Errorf("redis: db: must not be negative, got %d", c.DB)
	case c.Cluster && c.DB != 0:
		return errors.New("redis: db: Redis Cluster has only database 0")
	case c.DB != 0 && len(c.Addrs) == 0:
		// Without addrs the server comes from a URL ({env.REDIS_URL} by
		// default), whose path names the database: two places for one
		// value.
		return errors.New("redis: db needs addrs (with a URL, give the database as its path, such as redis://host:6379/2)")
	}
	return nil
}

// checkRedisURL accepts a redis:// or rediss:// URL, or a value that is a
// placeholder (such as {env.REDIS_URL}) and only known at load time. Errors
// never repeat the URL, since it may hold a password.
func checkRedisURL(s string) error {
	if strings.HasPrefix(s, "{") {
		return nil
	}
	lower := strings.ToLower(s)
	if !strings.HasPrefix(lower, "redis://") && !strings.HasPrefix(lower, "rediss://") {
		return errors.New("URL must start with redis:// or rediss:// (or be a placeholder such as {env.REDIS_URL})")
	}
	if strings.Contains(s, "{") {
		// Parts of it are placeholders; the rest is checked when it is loaded.
		return nil
	}
	u, err := url.Parse(s)
	if err != nil {
		var uerr *url.Error
		if errors.As(err, &uerr) {
			err = uerr.Err // without the URL and its password
		}
		return errors.New("invalid URL: " + err.Error())
	}
	if db := strings.TrimPrefix(u.Path, "/"); db != "" {
		if n, err := strconv.Atoi(db); err != nil || n < 0 {
			return errors.New("the URL's path must be a database number, such as /0")
		}
	}
	return nil
}

// checkAddr accepts host:port, or a value with placeholders.
func checkAddr(a string) error {
	if strings.Contains(a, "{") {
		return nil
	}
	if _, port, err := net.SplitHostPort(a); err != nil || port == "" {
		return errors.New("want host:port, got '" + a + "'")
	}
	return nil
}

// options turns the config into go-redis options, expanding placeholders
// such as {env.REDIS_URL}, and says whether it is a Cluster.
func (c *RedisConfig) options() (*redis.UniversalOptions, bool, error) {
	if err := c.validate(); err != nil {
		return nil, false, err
	}
	repl := caddy.NewReplacer()
	if c == nil {
		c = &RedisConfig{}
	}
	if len(c.Addrs) > 0 {
		addrs := make([]string, len(c.Addrs))
		for i, a := range c.Addrs {
			addrs[i] = repl.ReplaceAll(a, "")
			if err := checkAddr(addrs[i]); err != nil {
				return nil, false, fmt.Errorf("redis: addrs: %w", err)
			}
		}
		opts := &redis.UniversalOptions{
			Addrs:      addrs,
			MasterName: c.MasterName,
			Username:   repl.ReplaceAll(c.Username, ""),
			Password:   repl.ReplaceAll(c.Password, ""),
			DB:         c.DB,
		}
		if c.TLS {
			opts.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12}
		}
		return opts, c.Cluster, nil
	}
	raw := c.URL
	if raw == "" {
		raw = "{env.REDIS_URL}"
	}
	u := strings.TrimSpace(repl.ReplaceAll(raw, ""))
	if u == "" {
		u = defaultRedisURL
	}
	opts, err := broker.ParseURL(u)
	if err != nil {
		return nil, false, fmt.Errorf("redis: %w", err)
	}
	if c.Username != "" {
		opts.Username = repl.ReplaceAll(c.Username, "")
	}
	if c.Password != "" {
		opts.Password = repl.ReplaceAll(c.Password, "")
	}
	if c.TLS && opts.TLSConfig == nil {
		opts.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	return opts, c.Cluster, nil
}

// hubKey names the Redis that opts and cluster reach: configs with the same
// key share one hub. It holds the password (two configs with other
// credentials must not share a connection), so it is never shown: see
// describeHubKey.
func hubKey(opts *redis.UniversalOptions, cluster, sharded bool) (string, error) {
	b, err := json.Marshal([]any{opts.Addrs, opts.MasterName, opts.Username,
		opts.Password, opts.DB, opts.TLSConfig != nil, cluster, sharded})
	if err != nil {
		return "", fmt.Errorf("redis: %w", err)
	}
	return string(b), nil
}

// describeHubKey reads the Redis configuration back from a hub key. Only
// the fields named here are ever taken from it, never the credentials, and
// the key itself is never shown.
func describeHubKey(key any) redisDescription {
	s, _ := key.(string)
	var fields []json.RawMessage
	if err := json.Unmarshal([]byte(s), &fields); err != nil || len(fields) < 7 {
		return redisDescription{Mode: "unknown", Addrs: []string{}}
	}
	var d redisDescription
	var cluster bool
	_ = json.Unmarshal(fields[0], &d.Addrs)
	_ = json.Unmarshal(fields[1], &d.MasterName)
	// fields[2] and fields[3] are the username and password: never read.
	_ = json.Unmarshal(fields[4], &d.DB)
	_ = json.Unmarshal(fields[5], &d.TLS)
	_ = json.Unmarshal(fields[6], &cluster)
	var sharded bool
	if len(fields) > 7 {
		_ = json.Unmarshal(fields[7], &sharded)
	}
	if d.Addrs == nil {
		d.Addrs = []string{}
	}
	switch {
	case sharded:
		d.Mode = "sharded"
	case d.MasterName != "":
		d.Mode = "sentinel"
	case cluster || len(d.Addrs) > 1:
		d.Mode = "cluster"
	default:
		d.Mode = "single"
	}
	return d
}

// History is the per-channel retention that serves Last-Event-ID resume.
type History struct {
	// Size keeps about this many recent events per channel. At least 1: a
	// history option without a size is refused, not taken for no history.
	Size int `json:"size,omitempty"`
	// TTL drops a channel's history after this long without a publish.
	TTL caddy.Duration `json:"ttl,omitempty"`
}

// validate refuses a history that keeps nothing: whoever writes a history
// option wants resume, and a size of 0 (or none, in JSON) would silently
// turn it off.
func (hi *History) validate() error {
	switch {
	case hi == nil:
		return nil
	case hi.Size < 1:
		return fmt.Errorf("history: size must be a positive integer, got '%d'", hi.Size)
	case hi.TTL < 0:
		return fmt.Errorf("history: ttl must not be negative, got '%s'", time.Duration(hi.TTL))
	}
	return nil
}

// retention is the history a config asks Redis to keep.
func (hi *History) retention() broker.Retention {
	if hi == nil {
		return broker.Retention{}
	}
	return broker.Retention{MaxLen: int64(hi.Size), TTL: time.Duration(hi.TTL)}
}

// parseRedis reads the `redis` option, whose name is the current token:
// either a URL on its line or a block, not both (a URL plus a block would
// leave open which of the two wins for the password or the database).
func parseRedis(d *caddyfile.Dispenser) (*RedisConfig, error) {
	rc := new(RedisConfig)
	switch args := d.RemainingArgs(); len(args) {
	case 0:
	case 1:
		rc.URL = args[0]
	default:
		return nil, d.Errf("redis: want one URL or a block, got %d arguments", len(args))
	}

	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if rc.URL != "" {
			return nil, d.Err("redis: give either a URL or a block, not both")
		}
		if err := once(d, seen, "redis: ", "addrs"); err != nil {
			return nil, err
		}
		if err := rc.unmarshalOption(d); err != nil {
			return nil, err
		}
	}

	// An empty block counts as none.
	if rc.URL == "" && len(seen) == 0 {
		return nil, d.Err("redis: want a redis:// or rediss:// URL or a block")
	}
	if seen["db"] && rc.DB == 0 && len(rc.Addrs) == 0 {
		// db 0 is the default, so validate cannot tell it was given.
		return nil, d.Err("redis: db needs addrs (with a URL, give the database as its path, such as redis://host:6379/2)")
	}
	if err := rc.validate(); err != nil {
		return nil, d.Err(err.Error())
	}
	return rc, nil
}

// unmarshalOption reads one option of the redis block, whose name is the
// current token.
func (rc *RedisConfig) unmarshalOption(d *caddyfile.Dispenser) error {
	var err error
	switch opt := d.Val(); opt {
	case "addrs":
		var addrs []string
		addrs, err = optArgs(d, "redis: addrs", 1, -1)
		rc.Addrs = append(rc.Addrs, addrs...)
	case "master_name":
		rc.MasterName, err = optArg(d, "redis: master_name")
	case "cluster":
		_, err = optArgs(d, "redis: cluster", 0, 0)
		rc.Cluster = true
	case "sharded":
		_, err = optArgs(d, "redis: sharded", 0, 0)
		rc.Sharded = true
	case "username":
		rc.Username, err = optArg(d, "redis: username")
	case "password":
		rc.Password, err = optArg(d, "redis: password")
	case "db":
		rc.DB, err = optInt(d, "redis: db")
	case "tls":
		_, err = optArgs(d, "redis: tls", 0, 0)
		rc.TLS = true
	default:
		return d.Errf("redis: unrecognized option '%s'", opt)
	}
	return err
}

// parseHistory reads `history <n> [<ttl>]`, whose name is the current token.
func parseHistory(d *caddyfile.Dispenser) (*History, error) {
	args, err := optArgs(d, "history", 1, 2)
	if err != nil {
		return nil, err
	}
	n, err := strconv.Atoi(args[0])
	if err != nil || n <= 0 {
		return nil, d.Errf("history: size must be a positive integer, got '%s'", args[0])
	}
	hi := &History{Size: n}
	if len(args) == 2 {
		ttl, err := caddy.ParseDuration(args[1])
		if err != nil {
			return nil, d.Errf("history: ttl: %v", err)
		}
		if ttl < 0 {
			return nil, d.Errf("history: ttl must not be negative, got '%s'", args[1])
		}
		hi.TTL = caddy.Duration(ttl)
	}
	if err := hi.validate(); err != nil {
		return nil, d.Err(err.Error())
	}
	return hi, nil
}

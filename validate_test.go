package caddysse

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

// validateConfig runs what `caddy validate` runs on a JSON config: decode,
// provision every module (handlers included) and validate, without starting
// listeners or the admin endpoint.
func validateConfig(t *testing.T, cfgJSON []byte) error {
	t.Helper()
	var cfg caddy.Config
	if err := json.Unmarshal(cfgJSON, &cfg); err != nil {
		t.Fatalf("decoding config: %v\n%s", err, cfgJSON)
	}
	return caddy.Validate(&cfg)
}

// TestCaddyfileValidate adapts a Caddyfile using both directives and
// validates it as `caddy validate` does. Redis is pointed at a port nothing
// listens on: loading a config must not need Redis.
func TestCaddyfileValidate(t *testing.T) {
	storage := t.TempDir()
	out, err := adaptCaddyfile(t, `{
	admin off
	storage file_system `+storage+`
}
:8080 {
	sse /events user:{http.request.header.X-User} {
		redis redis://127.0.0.1:1
		channel broadcast
		allow "user:[0-9]+|broadcast"
		format envelope
		keepalive 20s
		retry 3s
		buffer 128
		history 100 1h
		last_event_id {http.request.header.X-Resume}
		max_connections 1000
		max_channels 4
		max_duration 30m
		max_connections_per {http.auth.user.id} 3 evict_oldest
		presence {sse.jwt.sub} 10s
		lifecycle sse:lifecycle 1000
		jwt {
			key 0123456789abcdef0123456789abcdef
			from query token
			claim channels
		}
	}
	sse_publish /publish {
		redis redis://127.0.0.1:1
		channel {http.request.uri.query.channel}
		history 100 1h
		max_size 64KiB
	}
	sse_health /healthz {
		redis redis://127.0.0.1:1
	}
	reverse_proxy 127.0.0.1:1 {
		@stream header X-Sse-Channel *
		handle_response @stream {
			sse {
				redis redis://127.0.0.1:1
				channel {rp.header.X-Sse-Channel}
			}
		}
	}
}
`)
	if err != nil {
		t.Fatalf("adapting: %v", err)
	}
	if err := validateConfig(t, out); err != nil {
		t.Fatalf("validating the adapted config: %v\n%s", err, out)
	}
}

// TestValidateJSONErrors feeds values the Caddyfile parser refuses straight
// in JSON (as an operator using the JSON config or the admin API may), and
// expects `caddy validate` to refuse them naming the option.
func TestValidateJSONErrors(t *testing.T) {
	const redis = `"redis":{"url":"redis://127.0.0.1:1"}`
	sse := func(fields string) string { return `{"handler":"sse",` + redis + `,` + fields + `}` }
	tests := []struct {
		name    string
		handler string // the handler's JSON
		want    string
	}{
		{"negative buffer", sse(`"channels":["news"],"buffer":-1`), "buffer"},
		{"negative max_connections", sse(`"channels":["news"],"max_connections":-1`), "max_connections"},
		{"negative max_channels", sse(`"channels":["news"],"max_channels":-1`), "max_channels"},
		{"negative keepalive", sse(`"channels":["news"],"keepalive":-1000000000`), "keepalive"},
		{"negative retry", sse(`"channels":["news"],"retry":-1`), "retry"},
		{"negative max_duration", sse(`"channels":["news"],"max_duration":-1`), "max_duration"},
		{"negative history size", sse(`"channels":["news"],"history":{"size":-1}`), "history: size"},
		{"history size 0", sse(`"channels":["news"],"history":{"size":0}`), "history: size"},
		{"history without size", sse(`"channels":["news"],"history":{"ttl":60000000000}`), "history: size"},
		{"negative history ttl", sse(`"channels":["news"],"history":{"size":10,"ttl":-1}`), "history: ttl"},
		{"bad regexp", sse(`"channels":["news"],"allow":"user:("`), "allow"},
		{"bad format", sse(`"channels":["news"],"format":"json"`), "format"},
		{"no channel", sse(`"format":"raw"`), "channel"},
		{"reserved channel", sse(`"channels":["sse:r:news"]`), "channel"},
		{"control character in channel", sse(`"channels":["news\u0000x"]`), "channel"},
		{"max_connections_per without key", sse(`"channels":["news"],"max_connections_per":{"max":3}`), "max_connections_per"},
		{"max_connections_per zero", sse(`"channels":["news"],"max_connections_per":{"key":"{http.auth.user.id}"}`), "max_connections_per"},
		{"max_connections_per bad policy", sse(`"channels":["news"],"max_connections_per":{"key":"k","max":1,"policy":"lru"}`), "max_connections_per"},
		{"jwt without key", sse(`"channels":["news"],"jwt":{}`), "jwt: key"},
		{"jwt short secret", sse(`"channels":["news"],"jwt":{"key":"short"}`), "jwt: key"},
		{"jwt secret from an unset variable", sse(`"channels":["news"],"jwt":{"key":"{env.CADDY_SSE_TEST_UNSET_VARIABLE}"}`), "jwt: key"},
		{"jwt alg none", sse(`"channels":["news"],"jwt":{"key":"0123456789abcdef0123456789abcdef","alg":"none"}`), "jwt: alg"},
		{"jwt missing key file", sse(`"channels":["news"],"jwt":{"key":"/nonexistent/caddy-sse/key.pem","alg":"RS256"}`), "jwt: key"},
		{"jwt bad source", sse(`"channels":["news"],"jwt":{"key":"0123456789abcdef0123456789abcdef","from":[{}]}`), "jwt: from"},
		{"presence without identity", sse(`"channels":["news"],"presence":{"ttl":10000000000}`), "presence"},
		{"presence ttl too short", sse(`"channels":["news"],"presence":{"identity":"{http.auth.user.id}","ttl":1000000000}`), "presence: ttl"},
		{"presence negative ttl", sse(`"channels":["news"],"presence":{"identity":"{http.auth.user.id}","ttl":-1}`), "presence: ttl"},
		{"lifecycle without stream", sse(`"channels":["news"],"lifecycle":{"max_len":10}`), "lifecycle"},
		{"lifecycle negative max_len", sse(`"channels":["news"],"lifecycle":{"stream":"events","max_len":-1}`), "lifecycle"},
		{"lifecycle module key", sse(`"channels":["news"],"lifecycle":{"stream":"{sse}:instance:x"}`), "lifecycle"},

		// The redis option's rules are the Caddyfile's. Before they were
		// checked in JSON too, cluster with master_name built a Cluster
		// client on the Sentinels' addresses.
		{"redis cluster and sentinel", `{"handler":"sse","channels":["news"],"redis":{"addrs":["127.0.0.1:1"],"cluster":true,"master_name":"m"}}`, "master_name"},
		{"redis sharded without cluster", `{"handler":"sse","channels":["news"],"redis":{"addrs":["127.0.0.1:1","127.0.0.1:2"],"sharded":true}}`, "redis: sharded needs cluster"},
		{"redis sentinel with a url", `{"handler":"sse","channels":["news"],"redis":{"url":"redis://127.0.0.1:1","master_name":"m"}}`, "master_name"},
		{"redis url and addrs", `{"handler":"sse","channels":["news"],"redis":{"url":"redis://127.0.0.1:1","addrs":["127.0.0.1:1"]}}`, "addrs"},
		{"redis url scheme", `{"handler":"sse","channels":["news"],"redis":{"url":"http://127.0.0.1:1"}}`, "redis"},
		{"redis url database", `{"handler":"sse","channels":["news"],"redis":{"url":"redis://127.0.0.1:1/x"}}`, "redis"},
		{"redis addrs without port", `{"handler":"sse","channels":["news"],"redis":{"addrs":["redis"]}}`, "redis: addrs"},
		{"redis db in cluster", `{"handler":"sse","channels":["news"],"redis":{"addrs":["127.0.0.1:1"],"cluster":true,"db":2}}`, "redis: db"},
		{"redis negative db", `{"handler":"sse","channels":["news"],"redis":{"addrs":["127.0.0.1:1"],"db":-1}}`, "redis: db"},
		{"redis db with a url", `{"handler":"sse","channels":["news"],"redis":{"url":"redis://127.0.0.1:1/1","db":2}}`, "redis: db"},
		{"redis db without addrs", `{"handler":"sse","channels":["news"],"redis":{"db":2}}`, "redis: db"},

		{"publish redis cluster and sentinel", `{"handler":"sse_publish","channel":"news","redis":{"addrs":["127.0.0.1:1"],"cluster":true,"master_name":"m"}}`, "master_name"},
		{"publish history size 0", `{"handler":"sse_publish","channel":"news",` + redis + `,"history":{"size":0}}`, "history: size"},
		{"health redis cluster and sentinel", `{"handler":"sse_health","redis":{"addrs":["127.0.0.1:1"],"cluster":true,"master_name":"m"}}`, "master_name"},
		{"health redis db without addrs", `{"handler":"sse_health","redis":{"db":3}}`, "redis: db"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := serverConfig(t, tt.handler)
			err := validateConfig(t, []byte(cfg))
			if err == nil {
				t.Fatalf("config validated, want an error naming %q:\n%s", tt.want, cfg)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
		})
	}

	// The same handlers with valid values pass, so that the failures above
	// are the values' and not the scaffolding's.
	for _, handler := range []string{
		sse(`"channels":["news"],"buffer":1,"history":{"size":10,"ttl":60000000000}`),
		`{"handler":"sse","channels":["news"],"redis":{"addrs":["127.0.0.1:1"],"cluster":true}}`,
		`{"handler":"sse","channels":["news"],"redis":{"addrs":["127.0.0.1:1"],"master_name":"m","db":2}}`,
		`{"handler":"sse","channels":["news"],"redis":{"url":"redis://127.0.0.1:1/2","password":"secret","tls":true}}`,
		`{"handler":"sse_publish","channel":"news",` + redis + `,"history":{"size":1}}`,
		`{"handler":"sse_health",` + redis + `}`,
	} {
		t.Run("valid", func(t *testing.T) {
			if err := validateConfig(t, []byte(serverConfig(t, handler))); err != nil {
				t.Fatalf("valid handler %s: %v", handler, err)
			}
		})
	}
}

// serverConfig is a JSON config with one server whose route holds handler.
func serverConfig(t *testing.T, handler string) string {
	return `{"admin":{"disabled":true},"storage":{"module":"file_system","root":` +
		quoteJSON(t.TempDir()) + `},"apps":{"http":{"servers":{"srv0":{` +
		`"listen":[":8080"],"routes":[{"handle":[` + handler + `]}]}}}}}`
}

// quoteJSON encodes s as a JSON string.
func quoteJSON(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

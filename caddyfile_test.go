package caddysse

import (
	"encoding/json"
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

// adaptCaddyfile adapts a Caddyfile to JSON as `caddy adapt` does.
func adaptCaddyfile(t *testing.T, input string) ([]byte, error) {
	t.Helper()
	adapter := caddyconfig.GetAdapter("caddyfile")
	if adapter == nil {
		t.Fatal("caddyfile adapter not registered")
	}
	out, _, err := adapter.Adapt([]byte(input), map[string]any{"filename": "Caddyfile"})
	return out, err
}

// mustAdapt adapts input and decodes the result, failing the test on error.
func mustAdapt(t *testing.T, input string) any {
	t.Helper()
	out, err := adaptCaddyfile(t, input)
	if err != nil {
		t.Fatalf("adapting:\n%s\nerror: %v", input, err)
	}
	var cfg any
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatalf("decoding adapted config: %v\n%s", err, out)
	}
	return cfg
}

// walk calls fn on every JSON object in v, depth first, arrays in order and
// object keys sorted, so that the order handlers are met in is the order
// they run in within a route list.
func walk(v any, fn func(obj map[string]any)) {
	switch v := v.(type) {
	case map[string]any:
		fn(v)
		keys := make([]string, 0, len(v))
		for k := range v {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			walk(v[k], fn)
		}
	case []any:
		for _, e := range v {
			walk(e, fn)
		}
	}
}

// findHandlers returns every handler object named name in v.
func findHandlers(v any, name string) []map[string]any {
	var found []map[string]any
	walk(v, func(obj map[string]any) {
		if obj["handler"] == name {
			found = append(found, obj)
		}
	})
	return found
}

// handlerOrder returns the names of the handlers in v in the order met.
func handlerOrder(v any) []string {
	var names []string
	walk(v, func(obj map[string]any) {
		if name, ok := obj["handler"].(string); ok {
			names = append(names, name)
		}
	})
	return names
}

// index returns the position of name in names, or -1.
func index(names []string, name string) int {
	for i, n := range names {
		if n == name {
			return i
		}
	}
	return -1
}

// jsonValue decodes a JSON literal of the test table.
func jsonValue(t *testing.T, s string) any {
	t.Helper()
	var v any
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatalf("bad expected JSON %s: %v", s, err)
	}
	return v
}

// siteBlock wraps directives in a site block without a host, so that no
// automatic HTTPS or subroute gets in the way.
func siteBlock(directives string) string {
	return ":8080 {\n" + directives + "\n}\n"
}

func TestCaddyfileAdapt(t *testing.T) {
	tests := []struct {
		name      string
		directive string // handler name looked for in the adapted config
		input     string // directives inside the site block
		want      string // the handler's JSON
	}{
		{
			name:      "shorthand",
			directive: "sse",
			input:     `sse user:{http.request.uri.query.user}`,
			want:      `{"handler":"sse","channels":["user:{http.request.uri.query.user}"]}`,
		},
		{
			name:      "shorthand with Caddyfile placeholder shorthand",
			directive: "sse",
			input:     `sse user:{query.user}`,
			want:      `{"handler":"sse","channels":["user:{http.request.uri.query.user}"]}`,
		},
		{
			name:      "several channels on the line",
			directive: "sse",
			input:     `sse news user:{http.request.header.X-User}`,
			want:      `{"handler":"sse","channels":["news","user:{http.request.header.X-User}"]}`,
		},
		{
			name:      "two channel lines append",
			directive: "sse",
			input: `sse {
				channel a b
				channel c
			}`,
			want: `{"handler":"sse","channels":["a","b","c"]}`,
		},
		{
			name:      "line channels and block channels",
			directive: "sse",
			input: `sse news {
				channel user:{http.auth.user.id}
			}`,
			want: `{"handler":"sse","channels":["news","user:{http.auth.user.id}"]}`,
		},
		{
			name:      "redis URL",
			directive: "sse",
			input: `sse news {
				redis rediss://app:secret@redis.example:6380/2
			}`,
			want: `{"handler":"sse","channels":["news"],"redis":{"url":"rediss://app:secret@redis.example:6380/2"}}`,
		},
		{
			name:      "redis URL placeholder",
			directive: "sse",
			input: `sse news {
				redis {env.REDIS_URL}
			}`,
			want: `{"handler":"sse","channels":["news"],"redis":{"url":"{env.REDIS_URL}"}}`,
		},
		{
			name:      "redis URL with placeholder password",
			directive: "sse",
			input: `sse news {
				redis redis://:{env.REDIS_PASSWORD}@redis:6379/0
			}`,
			want: `{"handler":"sse","channels":["news"],"redis":{"url":"redis://:{env.REDIS_PASSWORD}@redis:6379/0"}}`,
		},
		{
			name:      "redis block sentinel with every sub-option",
			directive: "sse",
			input: `sse news {
				redis {
					addrs s1:26379 s2:26379
					addrs s3:26379
					master_name mymaster
					username app
					password {env.REDIS_PASSWORD}
					db 3
					tls
				}
			}`,
			want: `{"handler":"sse","channels":["news"],"redis":{
				"addrs":["s1:26379","s2:26379","s3:26379"],
				"master_name":"mymaster","username":"app",
				"password":"{env.REDIS_PASSWORD}","db":3,"tls":true}}`,
		},
		{
			name:      "redis block cluster",
			directive: "sse",
			input: `sse news {
				redis {
					addrs n1:7000 n2:7000 [::1]:7002
					cluster
					tls
				}
			}`,
			want: `{"handler":"sse","channels":["news"],"redis":{
				"addrs":["n1:7000","n2:7000","[::1]:7002"],"cluster":true,"tls":true}}`,
		},
		{
			name:      "redis block sharded cluster",
			directive: "sse",
			input: `sse news {
				redis {
					addrs n1:7000 n2:7000
					cluster
					sharded
				}
			}`,
			want: `{"handler":"sse","channels":["news"],"redis":{
				"addrs":["n1:7000","n2:7000"],"cluster":true,"sharded":true}}`,
		},
		{
			name:      "redis block without addrs",
			directive: "sse",
			input: `sse news {
				redis {
					username app
					password {env.REDIS_PASSWORD}
					tls
				}
			}`,
			want: `{"handler":"sse","channels":["news"],"redis":{
				"username":"app","password":"{env.REDIS_PASSWORD}","tls":true}}`,
		},
		{
			name:      "allow",
			directive: "sse",
			input: `sse {
				channel {http.request.uri.query.topic}
				allow "topic:[a-z0-9-]+"
			}`,
			want: `{"handler":"sse","channels":["{http.request.uri.query.topic}"],"allow":"topic:[a-z0-9-]+"}`,
		},
		{
			name:      "format envelope",
			directive: "sse",
			input: `sse news {
				format envelope
			}`,
			want: `{"handler":"sse","channels":["news"],"format":"envelope"}`,
		},
		{
			name:      "format raw",
			directive: "sse",
			input: `sse news {
				format raw
			}`,
			want: `{"handler":"sse","channels":["news"],"format":"raw"}`,
		},
		{
			name:      "durations",
			directive: "sse",
			input: `sse news {
				keepalive 30s
				retry 2500ms
				max_duration 1h
			}`,
			want: `{"handler":"sse","channels":["news"],
				"keepalive":30000000000,"retry":2500000000,"max_duration":3600000000000}`,
		},
		{
			name:      "integers",
			directive: "sse",
			input: `sse news {
				buffer 64
				max_connections 10000
				max_channels 4
			}`,
			want: `{"handler":"sse","channels":["news"],"buffer":64,"max_connections":10000,"max_channels":4}`,
		},
		{
			name:      "zero integers are the defaults",
			directive: "sse",
			input: `sse news {
				buffer 0
				max_connections 0
			}`,
			want: `{"handler":"sse","channels":["news"]}`,
		},
		{
			name:      "history with ttl",
			directive: "sse",
			input: `sse news {
				history 100 1h
			}`,
			want: `{"handler":"sse","channels":["news"],"history":{"size":100,"ttl":3600000000000}}`,
		},
		{
			name:      "history without ttl",
			directive: "sse",
			input: `sse news {
				history 50
			}`,
			want: `{"handler":"sse","channels":["news"],"history":{"size":50}}`,
		},
		{
			name:      "last_event_id",
			directive: "sse",
			input: `sse news {
				history 100
				last_event_id {http.request.header.X-Resume}
			}`,
			want: `{"handler":"sse","channels":["news"],"history":{"size":100},
				"last_event_id":"{http.request.header.X-Resume}"}`,
		},
		{
			name:      "takeover off",
			directive: "sse",
			input: `sse news {
				takeover off
			}`,
			want: `{"handler":"sse","channels":["news"],"takeover":false}`,
		},
		{
			name:      "every option",
			directive: "sse",
			input: `sse user:{http.auth.user.id} {
				redis redis://redis:6379
				channel broadcast
				allow "user:[0-9]+|broadcast"
				format envelope
				keepalive 20s
				retry 3s
				buffer 128
				history 1000 1d
				max_connections 50000
				max_channels 8
				max_duration 30m
			}`,
			want: `{"handler":"sse","channels":["user:{http.auth.user.id}","broadcast"],
				"redis":{"url":"redis://redis:6379"},"allow":"user:[0-9]+|broadcast",
				"format":"envelope","keepalive":20000000000,"retry":3000000000,"buffer":128,
				"history":{"size":1000,"ttl":86400000000000},
				"max_connections":50000,"max_channels":8,"max_duration":1800000000000}`,
		},
		{
			name:      "max_connections_per reject by default",
			directive: "sse",
			input: `sse news {
				max_connections_per {http.auth.user.id} 3
			}`,
			want: `{"handler":"sse","channels":["news"],
				"max_connections_per":{"key":"{http.auth.user.id}","max":3}}`,
		},
		{
			name:      "max_connections_per evict_oldest with shorthand",
			directive: "sse",
			input: `sse news {
				max_connections_per {remote_host} 1 evict_oldest
			}`,
			want: `{"handler":"sse","channels":["news"],
				"max_connections_per":{"key":"{http.request.remote.host}","max":1,"policy":"evict_oldest"}}`,
		},
		{
			name:      "max_connections_per reject",
			directive: "sse",
			input: `sse news {
				max_connections_per user-{http.auth.user.id} 2 reject
			}`,
			want: `{"handler":"sse","channels":["news"],
				"max_connections_per":{"key":"user-{http.auth.user.id}","max":2,"policy":"reject"}}`,
		},
		{
			name:      "jwt with defaults",
			directive: "sse",
			input: `sse user:{sse.jwt.sub} {
				jwt {
					key {env.SSE_JWT_SECRET}
				}
			}`,
			want: `{"handler":"sse","channels":["user:{sse.jwt.sub}"],"jwt":{"key":"{env.SSE_JWT_SECRET}"}}`,
		},
		{
			name:      "jwt with every option",
			directive: "sse",
			input: `sse {
				channel {query.room}
				jwt {
					key /etc/caddy/jwt.pem
					alg ES256
					from header
					from header X-Token
					from cookie sse_token
					from query token
					claim https://example.com/channels
					issuer https://auth.example.com
					audience sse
				}
			}`,
			want: `{"handler":"sse","channels":["{http.request.uri.query.room}"],"jwt":{
				"key":"/etc/caddy/jwt.pem","alg":"ES256",
				"from":[{"header":"Authorization"},{"header":"X-Token"},{"cookie":"sse_token"},{"query":"token"}],
				"claim":"https://example.com/channels","issuer":"https://auth.example.com","audience":"sse"}}`,
		},
		{
			name:      "jwt HS256 literal secret",
			directive: "sse",
			input: `sse news {
				jwt {
					alg HS256
					key 0123456789abcdef0123456789abcdef
				}
			}`,
			want: `{"handler":"sse","channels":["news"],"jwt":{"key":"0123456789abcdef0123456789abcdef","alg":"HS256"}}`,
		},
		{
			name:      "presence with ttl and lifecycle with maxlen",
			directive: "sse",
			input: `sse user:{http.auth.user.id} {
				presence {http.auth.user.id} 10s
				lifecycle sse:lifecycle 500
			}`,
			want: `{"handler":"sse","channels":["user:{http.auth.user.id}"],
				"presence":{"identity":"{http.auth.user.id}","ttl":10000000000},
				"lifecycle":{"stream":"sse:lifecycle","max_len":500}}`,
		},
		{
			name:      "presence and lifecycle with defaults",
			directive: "sse",
			input: `sse room:{query.room} {
				presence {sse.jwt.sub}
				lifecycle events
			}`,
			want: `{"handler":"sse","channels":["room:{http.request.uri.query.room}"],
				"presence":{"identity":"{sse.jwt.sub}"},"lifecycle":{"stream":"events"}}`,
		},
		{
			name:      "health",
			directive: "sse_health",
			input:     `sse_health /healthz`,
			want:      `{"handler":"sse_health"}`,
		},
		{
			name:      "health with redis",
			directive: "sse_health",
			input: `sse_health {
				redis redis://redis:6379/2
			}`,
			want: `{"handler":"sse_health","redis":{"url":"redis://redis:6379/2"}}`,
		},
		{
			name:      "publish channel",
			directive: "sse_publish",
			input: `sse_publish {
				channel user:{http.request.uri.query.user}
			}`,
			want: `{"handler":"sse_publish","channel":"user:{http.request.uri.query.user}"}`,
		},
		{
			name:      "publish shorthand",
			directive: "sse_publish",
			input:     `sse_publish news`,
			want:      `{"handler":"sse_publish","channel":"news"}`,
		},
		{
			name:      "publish redis URL",
			directive: "sse_publish",
			input: `sse_publish news {
				redis rediss://redis.example:6380
			}`,
			want: `{"handler":"sse_publish","channel":"news","redis":{"url":"rediss://redis.example:6380"}}`,
		},
		{
			name:      "publish redis block",
			directive: "sse_publish",
			input: `sse_publish news {
				redis {
					addrs s1:26379
					master_name mymaster
					username app
					password secret
					db 1
					tls
				}
			}`,
			want: `{"handler":"sse_publish","channel":"news","redis":{"addrs":["s1:26379"],
				"master_name":"mymaster","username":"app","password":"secret","db":1,"tls":true}}`,
		},
		{
			name:      "publish history",
			directive: "sse_publish",
			input: `sse_publish news {
				history 100 1h
			}`,
			want: `{"handler":"sse_publish","channel":"news","history":{"size":100,"ttl":3600000000000}}`,
		},
		{
			name:      "publish max_size plain",
			directive: "sse_publish",
			input: `sse_publish news {
				max_size 65536
			}`,
			want: `{"handler":"sse_publish","channel":"news","max_size":65536}`,
		},
		{
			name:      "publish max_size KiB",
			directive: "sse_publish",
			input: `sse_publish news {
				max_size 64KiB
			}`,
			want: `{"handler":"sse_publish","channel":"news","max_size":65536}`,
		},
		{
			name:      "publish max_size MB",
			directive: "sse_publish",
			input: `sse_publish news {
				max_size 1MB
			}`,
			want: `{"handler":"sse_publish","channel":"news","max_size":1000000}`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := mustAdapt(t, siteBlock(tt.input))
			found := findHandlers(cfg, tt.directive)
			if len(found) != 1 {
				t.Fatalf("want one %s handler, found %d in the adapted config", tt.directive, len(found))
			}
			want := jsonValue(t, tt.want)
			if !reflect.DeepEqual(any(found[0]), want) {
				got, _ := json.Marshal(found[0])
				wantJSON, _ := json.Marshal(want)
				t.Errorf("handler JSON\n got: %s\nwant: %s", got, wantJSON)
			}
		})
	}
}

// TestCaddyfileOrder checks that sse and sse_publish run before reverse_proxy
// in a plain site block, the way the README tells operators to write it:
// no `route` block, reverse_proxy written first; and after basic_auth, so
// that authentication guards the streams and the publish endpoint.
func TestCaddyfileOrder(t *testing.T) {
	cfg := mustAdapt(t, siteBlock(`
		reverse_proxy localhost:9000
		sse /events user:{http.auth.user.id}
		sse_publish /publish/* {
			channel {http.request.uri.query.channel}
		}
		sse_health /healthz
		basic_auth {
			alice $2a$14$Zkx19XLiW6VYouLHR5NmfOFU0z2GTNmpkT/5qqR7hx4IjWJPDhjvG
		}
	`))
	order := handlerOrder(cfg)
	auth, rp := index(order, "authentication"), index(order, "reverse_proxy")
	s, pub := index(order, "sse"), index(order, "sse_publish")
	if auth < 0 || rp < 0 || s < 0 || pub < 0 {
		t.Fatalf("handlers missing from the adapted config: %v", order)
	}
	if s > rp || pub > rp {
		t.Errorf("sse and sse_publish must come before reverse_proxy, got %v", order)
	}
	if hl := index(order, "sse_health"); hl < 0 || hl > rp {
		t.Errorf("sse_health must come before reverse_proxy, got %v", order)
	}
	if s < auth || pub < auth {
		t.Errorf("sse and sse_publish must come after basic_auth, got %v", order)
	}

	// The matcher is the route's, not the handler's: the handler JSON holds
	// the channel only, and the route matches /events.
	var matched bool
	walk(cfg, func(obj map[string]any) {
		handle, _ := obj["handle"].([]any)
		if len(handle) == 0 || len(findHandlers(handle, "sse")) == 0 {
			return
		}
		if reflect.DeepEqual(obj["match"], jsonValue(t, `[{"path":["/events"]}]`)) {
			matched = true
		}
	})
	if !matched {
		t.Errorf("no route with matcher path /events holds the sse handler")
	}
}

// TestCaddyfileHandleResponse checks the backend-driven form of the SPEC:
// sse inside reverse_proxy's handle_response, with the channel taken from
// the backend's response header.
func TestCaddyfileHandleResponse(t *testing.T) {
	cfg := mustAdapt(t, siteBlock(`
		reverse_proxy localhost:9000 {
			@stream header X-Sse-Channel *
			handle_response @stream {
				sse {
					channel {rp.header.X-Sse-Channel}
					format envelope
					history 100
					last_event_id {rp.header.X-Sse-Last-Event-Id}
				}
			}
		}
	`))
	proxies := findHandlers(cfg, "reverse_proxy")
	if len(proxies) != 1 {
		t.Fatalf("want one reverse_proxy handler, found %d", len(proxies))
	}
	// The sse handler must live inside reverse_proxy's handle_response
	// routes, not beside it in the site's routes.
	found := findHandlers(proxies[0]["handle_response"], "sse")
	if len(found) != 1 {
		t.Fatalf("want one sse handler in handle_response, found %d", len(found))
	}
	want := jsonValue(t, `{"handler":"sse","channels":["{http.reverse_proxy.header.X-Sse-Channel}"],
		"format":"envelope","history":{"size":100},
		"last_event_id":"{http.reverse_proxy.header.X-Sse-Last-Event-Id}"}`)
	if !reflect.DeepEqual(any(found[0]), want) {
		got, _ := json.Marshal(found[0])
		t.Errorf("handler JSON\n got: %s\nwant %s", got, jsonValueString(want))
	}
	if n := len(findHandlers(cfg, "sse")); n != 1 {
		t.Errorf("want the sse handler only in handle_response, found %d in the config", n)
	}
}

// jsonValueString encodes v for a failure message.
func jsonValueString(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func TestCaddyfileAdaptErrors(t *testing.T) {
	tests := []struct {
		name  string
		input string // directives inside the site block
		want  string // the error must contain this (the option's name)
	}{
		// sse: options
		{"unknown option", "sse news {\n foo bar\n}", "unrecognized sse option 'foo'"},
		{"option given a block", "sse news {\n format raw {\n envelope\n }\n}", "format"},
		{"repeated option", "sse news {\n format raw\n format envelope\n}", "format"},
		{"takeover neither on nor off", "sse news {\n takeover maybe\n}", "takeover"},
		{"takeover without argument", "sse news {\n takeover\n}", "takeover"},

		// sse: channels
		{"no channel at all", "sse", "channel"},
		{"no channel in block", "sse {\n format raw\n}", "channel"},
		{"channel without argument", "sse {\n channel\n}", "channel"},
		{"empty channel", "sse \"\"", "channel"},
		{"path-like channel is a matcher", "sse /events", "channel"},

		// sse: redis
		{"redis http URL", "sse news {\n redis http://redis:6379\n}", "redis"},
		{"redis bare address", "sse news {\n redis redis:6379\n}", "redis"},
		{"redis unparsable URL", "sse news {\n redis redis://[::1\n}", "redis"},
		{"redis URL with bad db", "sse news {\n redis redis://redis:6379/x\n}", "redis"},
		{"redis no argument or block", "sse news {\n redis\n}", "redis"},
		{"redis two URLs", "sse news {\n redis redis://a redis://b\n}", "redis"},
		{"redis URL and block", "sse news {\n redis redis://a {\n tls\n }\n}", "redis"},
		{"redis unknown sub-option", "sse news {\n redis {\n host a\n }\n}", "host"},
		{"redis addrs without port", "sse news {\n redis {\n addrs redis\n }\n}", "addrs"},
		{"redis addrs without argument", "sse news {\n redis {\n addrs\n }\n}", "addrs"},
		{"redis db not integer", "sse news {\n redis {\n addrs a:1\n db one\n }\n}", "db"},
		{"redis db negative", "sse news {\n redis {\n addrs a:1\n db -1\n }\n}", "db"},
		{"redis db in cluster", "sse news {\n redis {\n addrs a:1\n cluster\n db 2\n }\n}", "db"},
		{"redis cluster and sentinel", "sse news {\n redis {\n addrs a:1\n cluster\n master_name m\n }\n}", "master_name"},
		{"redis sentinel without addrs", "sse news {\n redis {\n master_name m\n }\n}", "master_name"},
		{"redis cluster with argument", "sse news {\n redis {\n addrs a:1\n cluster yes\n }\n}", "cluster"},
		{"redis sharded without cluster", "sse news {\n redis {\n addrs a:1 b:2\n sharded\n }\n}", "sharded needs cluster"},
		{"redis sharded with argument", "sse news {\n redis {\n addrs a:1\n cluster\n sharded on\n }\n}", "sharded"},
		{"redis tls with argument", "sse news {\n redis {\n tls on\n }\n}", "tls"},
		{"redis password two arguments", "sse news {\n redis {\n password a b\n }\n}", "password"},
		{"redis username missing", "sse news {\n redis {\n username\n }\n}", "username"},
		{"redis db without addrs", "sse news {\n redis {\n db 2\n }\n}", "db"},
		{"redis option repeated", "sse news {\n redis {\n tls\n tls\n }\n}", "tls"},
		{"redis repeated", "sse news {\n redis redis://a\n redis redis://b\n}", "redis"},

		// sse: values
		{"bad regexp", "sse news {\n allow user:(\n}", "allow"},
		{"allow two arguments", "sse news {\n allow a b\n}", "allow"},
		{"bad format", "sse news {\n format json\n}", "format"},
		{"format two arguments", "sse news {\n format raw envelope\n}", "format"},
		{"negative buffer", "sse news {\n buffer -1\n}", "buffer"},
		{"buffer not integer", "sse news {\n buffer lots\n}", "buffer"},
		{"buffer missing", "sse news {\n buffer\n}", "buffer"},
		{"negative max_connections", "sse news {\n max_connections -1\n}", "max_connections"},
		{"negative max_channels", "sse news {\n max_channels -5\n}", "max_channels"},
		{"bad keepalive", "sse news {\n keepalive soon\n}", "keepalive"},
		{"negative keepalive", "sse news {\n keepalive -1s\n}", "keepalive"},
		{"keepalive two arguments", "sse news {\n keepalive 1s 2s\n}", "keepalive"},
		{"bad retry", "sse news {\n retry 3\n}", "retry"},
		{"bad max_duration", "sse news {\n max_duration forever\n}", "max_duration"},
		{"history zero", "sse news {\n history 0\n}", "history"},
		{"history negative", "sse news {\n history -5\n}", "history"},
		{"history not integer", "sse news {\n history many\n}", "history"},
		{"history bad ttl", "sse news {\n history 10 soon\n}", "history"},
		{"history negative ttl", "sse news {\n history 10 -1h\n}", "history"},
		{"history missing size", "sse news {\n history\n}", "history"},
		{"history too many arguments", "sse news {\n history 10 1h 2h\n}", "history"},
		{"last_event_id missing", "sse news {\n last_event_id\n}", "last_event_id"},
		{"last_event_id two arguments", "sse news {\n last_event_id a b\n}", "last_event_id"},

		// sse: max_connections_per
		{"max_connections_per missing", "sse news {\n max_connections_per\n}", "max_connections_per"},
		{"max_connections_per without n", "sse news {\n max_connections_per {remote_host}\n}", "max_connections_per"},
		{"max_connections_per zero", "sse news {\n max_connections_per {remote_host} 0\n}", "max_connections_per"},
		{"max_connections_per negative", "sse news {\n max_connections_per {remote_host} -2\n}", "max_connections_per"},
		{"max_connections_per not a number", "sse news {\n max_connections_per {remote_host} many\n}", "max_connections_per"},
		{"max_connections_per bad policy", "sse news {\n max_connections_per {remote_host} 3 evict_newest\n}", "max_connections_per"},
		{"max_connections_per too many arguments", "sse news {\n max_connections_per {remote_host} 3 reject now\n}", "max_connections_per"},
		{"max_connections_per empty key", "sse news {\n max_connections_per \"\" 3\n}", "max_connections_per"},
		{"max_connections_per repeated", "sse news {\n max_connections_per a 1\n max_connections_per b 2\n}", "max_connections_per"},

		// sse: jwt
		{"jwt without block", "sse news {\n jwt\n}", "jwt: key"},
		{"jwt empty block", "sse news {\n jwt {\n }\n}", "jwt: key"},
		{"jwt with argument", "sse news {\n jwt secret\n}", "jwt"},
		{"jwt without key", "sse news {\n jwt {\n alg RS256\n }\n}", "jwt: key"},
		{"jwt key two arguments", "sse news {\n jwt {\n key a b\n }\n}", "jwt: key"},
		{"jwt short secret", "sse news {\n jwt {\n key secret\n }\n}", "jwt: key"},
		{"jwt alg none", "sse news {\n jwt {\n key {env.K}\n alg none\n }\n}", "jwt: alg"},
		{"jwt alg unsupported", "sse news {\n jwt {\n key {env.K}\n alg HS512\n }\n}", "jwt: alg"},
		{"jwt from unknown place", "sse news {\n jwt {\n key {env.K}\n from body token\n }\n}", "jwt: from"},
		{"jwt from cookie without name", "sse news {\n jwt {\n key {env.K}\n from cookie\n }\n}", "jwt: from"},
		{"jwt from query too many", "sse news {\n jwt {\n key {env.K}\n from query a b\n }\n}", "jwt: from"},
		{"jwt from missing", "sse news {\n jwt {\n key {env.K}\n from\n }\n}", "jwt: from"},
		{"jwt claim missing", "sse news {\n jwt {\n key {env.K}\n claim\n }\n}", "jwt: claim"},
		{"jwt unknown option", "sse news {\n jwt {\n key {env.K}\n secret x\n }\n}", "jwt: unrecognized option 'secret'"},
		{"jwt option repeated", "sse news {\n jwt {\n key {env.K}\n alg RS256\n alg ES256\n }\n}", "jwt: alg"},
		{"jwt repeated", "sse news {\n jwt {\n key {env.K}\n }\n jwt {\n key {env.K}\n }\n}", "jwt"},

		// sse: presence and lifecycle
		{"presence missing", "sse news {\n presence\n}", "presence"},
		{"presence too many arguments", "sse news {\n presence {http.auth.user.id} 10s 20s\n}", "presence"},
		{"presence bad ttl", "sse news {\n presence {http.auth.user.id} soon\n}", "presence: ttl"},
		{"presence ttl too short", "sse news {\n presence {http.auth.user.id} 1s\n}", "presence: ttl"},
		{"presence ttl zero", "sse news {\n presence {http.auth.user.id} 0s\n}", "presence: ttl"},
		{"presence ttl negative", "sse news {\n presence {http.auth.user.id} -5s\n}", "presence: ttl"},
		{"presence empty identity", "sse news {\n presence \"\"\n}", "presence"},
		{"presence repeated", "sse news {\n presence a\n presence b\n}", "presence"},
		{"presence with block", "sse news {\n presence a {\n ttl 3s\n }\n}", "presence"},
		{"lifecycle missing", "sse news {\n lifecycle\n}", "lifecycle"},
		{"lifecycle maxlen zero", "sse news {\n lifecycle events 0\n}", "lifecycle: maxlen"},
		{"lifecycle maxlen negative", "sse news {\n lifecycle events -1\n}", "lifecycle: maxlen"},
		{"lifecycle maxlen not a number", "sse news {\n lifecycle events lots\n}", "lifecycle: maxlen"},
		{"lifecycle too many arguments", "sse news {\n lifecycle events 10 20\n}", "lifecycle"},
		{"lifecycle history key", "sse news {\n lifecycle sse:h:news\n}", "lifecycle"},
		{"lifecycle presence key", "sse news {\n lifecycle {sse}:presence:news\n}", "lifecycle"},
		{"lifecycle counter key", "sse news {\n lifecycle sse:seq\n}", "lifecycle"},
		{"lifecycle repeated", "sse news {\n lifecycle a\n lifecycle b\n}", "lifecycle"},

		// sse_health
		{"health argument", "sse_health /healthz now", "sse_health"},
		{"health unknown option", "sse_health {\n channel x\n}", "unrecognized sse_health option 'channel'"},
		{"health bad redis", "sse_health {\n redis localhost:6379\n}", "redis"},
		{"health redis repeated", "sse_health {\n redis redis://a\n redis redis://b\n}", "redis"},

		// sse_publish
		{"publish unknown option", "sse_publish news {\n foo\n}", "unrecognized sse_publish option 'foo'"},
		{"publish no channel", "sse_publish", "channel"},
		{"publish two channels on the line", "sse_publish a b", "channel"},
		{"publish two channels in block", "sse_publish {\n channel a b\n}", "channel"},
		{"publish channel twice", "sse_publish a {\n channel b\n}", "channel"},
		{"publish channel line twice", "sse_publish {\n channel a\n channel b\n}", "channel"},
		{"publish channel without argument", "sse_publish {\n channel\n}", "channel"},
		{"publish bad redis URL", "sse_publish news {\n redis localhost\n}", "redis"},
		{"publish bad history", "sse_publish news {\n history 0 1h\n}", "history"},
		{"publish bad max_size", "sse_publish news {\n max_size lots\n}", "max_size"},
		{"publish negative max_size", "sse_publish news {\n max_size -1\n}", "max_size"},
		{"publish max_size missing", "sse_publish news {\n max_size\n}", "max_size"},
		{"publish max_size two arguments", "sse_publish news {\n max_size 1 2\n}", "max_size"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := adaptCaddyfile(t, siteBlock(tt.input))
			if err == nil {
				t.Fatalf("adapting %q succeeded, want an error naming %q; got:\n%s", tt.input, tt.want, out)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
		})
	}
}

// TestCaddyfileErrorsHideRedisPassword checks that a bad Redis URL is not
// repeated in the error, which ends up in logs and CI output.
func TestCaddyfileErrorsHideRedisPassword(t *testing.T) {
	for _, url := range []string{
		"http://user:hunter2@redis:6379",
		"redis://user:hunter2@[::1",
		"redis://user:hunter2@redis:6379/zero",
	} {
		_, err := adaptCaddyfile(t, siteBlock("sse news {\n redis "+url+"\n}"))
		if err == nil {
			t.Fatalf("adapting redis %s succeeded", url)
		}
		if strings.Contains(err.Error(), "hunter2") {
			t.Errorf("error repeats the password: %v", err)
		}
	}
}

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
// expects provisioning or validation to refuse them naming the option.
func TestValidateJSONErrors(t *testing.T) {
	tests := []struct {
		name    string
		handler string // the sse handler's JSON fields after "handler"
		want    string
	}{
		{"negative buffer", `"channels":["news"],"buffer":-1`, "buffer"},
		{"negative max_connections", `"channels":["news"],"max_connections":-1`, "max_connections"},
		{"negative max_channels", `"channels":["news"],"max_channels":-1`, "max_channels"},
		{"negative keepalive", `"channels":["news"],"keepalive":-1000000000`, "keepalive"},
		{"negative retry", `"channels":["news"],"retry":-1`, "retry"},
		{"negative max_duration", `"channels":["news"],"max_duration":-1`, "max_duration"},
		{"negative history size", `"channels":["news"],"history":{"size":-1}`, "history"},
		{"negative history ttl", `"channels":["news"],"history":{"size":10,"ttl":-1}`, "history"},
		{"bad regexp", `"channels":["news"],"allow":"user:("`, "allow"},
		{"bad format", `"channels":["news"],"format":"json"`, "format"},
		{"no channel", `"format":"raw"`, "channel"},
		{"reserved channel", `"channels":["sse:r:news"]`, "channel"},
		{"control character in channel", `"channels":["news\u0000x"]`, "channel"},
		{"max_connections_per without key", `"channels":["news"],"max_connections_per":{"max":3}`, "max_connections_per"},
		{"max_connections_per zero", `"channels":["news"],"max_connections_per":{"key":"{http.auth.user.id}"}`, "max_connections_per"},
		{"max_connections_per bad policy", `"channels":["news"],"max_connections_per":{"key":"k","max":1,"policy":"lru"}`, "max_connections_per"},
		{"jwt without key", `"channels":["news"],"jwt":{}`, "jwt: key"},
		{"jwt short secret", `"channels":["news"],"jwt":{"key":"short"}`, "jwt: key"},
		{"jwt secret from an unset variable", `"channels":["news"],"jwt":{"key":"{env.CADDY_SSE_TEST_UNSET_VARIABLE}"}`, "jwt: key"},
		{"jwt alg none", `"channels":["news"],"jwt":{"key":"0123456789abcdef0123456789abcdef","alg":"none"}`, "jwt: alg"},
		{"jwt missing key file", `"channels":["news"],"jwt":{"key":"/nonexistent/caddy-sse/key.pem","alg":"RS256"}`, "jwt: key"},
		{"jwt bad source", `"channels":["news"],"jwt":{"key":"0123456789abcdef0123456789abcdef","from":[{}]}`, "jwt: from"},
		{"presence without identity", `"channels":["news"],"presence":{"ttl":10000000000}`, "presence"},
		{"presence ttl too short", `"channels":["news"],"presence":{"identity":"{http.auth.user.id}","ttl":1000000000}`, "presence: ttl"},
		{"presence negative ttl", `"channels":["news"],"presence":{"identity":"{http.auth.user.id}","ttl":-1}`, "presence: ttl"},
		{"lifecycle without stream", `"channels":["news"],"lifecycle":{"max_len":10}`, "lifecycle"},
		{"lifecycle negative max_len", `"channels":["news"],"lifecycle":{"stream":"events","max_len":-1}`, "lifecycle"},
		{"lifecycle module key", `"channels":["news"],"lifecycle":{"stream":"{sse}:instance:x"}`, "lifecycle"},
		{"sharded without cluster", `"redis":{"addrs":["127.0.0.1:1","127.0.0.1:2"],"sharded":true},"channels":["news"]`, "redis: sharded needs cluster"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := `{"admin":{"disabled":true},"storage":{"module":"file_system","root":` +
				jsonValueString(t.TempDir()) + `},"apps":{"http":{"servers":{"srv0":{` +
				`"listen":[":8080"],"routes":[{"handle":[{"handler":"sse",` +
				`"redis":{"url":"redis://127.0.0.1:1"},` + tt.handler + `}]}]}}}}}`
			err := validateConfig(t, []byte(cfg))
			if err == nil {
				t.Fatalf("config validated, want an error naming %q:\n%s", tt.want, cfg)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
		})
	}

	// The same config with valid values must pass, so that the failures
	// above are the values' and not the scaffolding's.
	t.Run("valid", func(t *testing.T) {
		cfg := `{"admin":{"disabled":true},"storage":{"module":"file_system","root":` +
			jsonValueString(t.TempDir()) + `},"apps":{"http":{"servers":{"srv0":{` +
			`"listen":[":8080"],"routes":[{"handle":[{"handler":"sse",` +
			`"redis":{"url":"redis://127.0.0.1:1"},"channels":["news"],"buffer":1,` +
			`"history":{"size":10,"ttl":60000000000}}]}]}}}}}`
		if err := validateConfig(t, []byte(cfg)); err != nil {
			t.Fatalf("valid config: %v", err)
		}
	})
}

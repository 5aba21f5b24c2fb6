package caddysse

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/caddytest"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

// TestCaddyfileAdaptToJSON adapts every testdata/adapt/*.caddyfiletest as
// Caddy's own caddyfile_adapt tests do: a Caddyfile, a line of dashes, and
// the JSON it must adapt to (or, when that part is not JSON, text the
// adapt error must contain). The JSON is the handlers' config exactly, and
// where they land among Caddy's own handlers (the directive order, the
// routes of reverse_proxy's handle_response).
func TestCaddyfileAdaptToJSON(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "adapt", "*.caddyfiletest"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no testdata/adapt/*.caddyfiletest (%v)", err)
	}
	newlines := regexp.MustCompile(`\r?\n`)
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			parts := strings.Split(newlines.ReplaceAllString(string(data), "\n"), "----------")
			if len(parts) != 2 {
				t.Fatalf("want a Caddyfile and an expected result separated by a line of dashes, got %d parts", len(parts))
			}
			caddyfile, expected := strings.TrimSpace(parts[0])+"\n", strings.TrimSpace(parts[1])
			if strings.HasPrefix(expected, "{") {
				if !caddytest.CompareAdapt(t, file, caddyfile, "caddyfile", expected) {
					t.Errorf("%s does not adapt to its JSON (the diff is above)", file)
				}
				return
			}
			_, _, err = caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
			if err == nil || !strings.Contains(err.Error(), expected) {
				t.Errorf("adapt error %v, want one containing %q", err, expected)
			}
		})
	}
}

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

// siteBlock wraps directives in a site block without a host, so that no
// automatic HTTPS or subroute gets in the way.
func siteBlock(directives string) string {
	return ":8080 {\n" + directives + "\n}\n"
}

// TestCaddyfileAdaptErrors checks that every bad option fails `caddy adapt`
// with a message that names the option.
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

package caddysse

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// FuzzCaddyfile puts random option text inside an `sse` block and adapts
// the Caddyfile as `caddy adapt` does. Adapting must never panic: it either
// fails or yields a config whose sse handler decodes and passes Validate,
// since the Caddyfile parser checks every value Validate checks.
//
//	go test -run XXX -fuzz FuzzCaddyfile .
func FuzzCaddyfile(f *testing.F) {
	for _, seed := range []string{
		"channel user:{http.auth.user.id}",
		"redis redis://127.0.0.1:6379\nformat envelope\nhistory 100 1h",
		"redis {\n addrs a:1 b:2\n master_name m\n password {env.P}\n db 2\n}",
		"allow \"user:[0-9]+\"\nbuffer 64\nkeepalive 15s\nretry 3s",
		"max_connections 10\nmax_channels 4\nmax_duration 1h\nlast_event_id {header.X}",
		"max_connections_per {http.auth.user.id} 3 evict_oldest",
		"max_connections_per {remote_host} 1",
		"jwt {\n key {env.SSE_JWT_SECRET}\n from query token\n from cookie c\n claim rooms\n}",
		"jwt {\n key /k.pem\n alg ES256\n from header\n issuer i\n audience a\n}",
		"jwt {\n jwt {\n key x\n }\n}",
		"max_connections_per \"\" 3",
		"history -1\nbuffer -1",
		"redis {\n}\n}\n{",
		"jwt {\n key \"0123456789abcdef0123456789abcdef\"\n alg HS256\n}",
	} {
		f.Add(seed)
	}
	adapter := caddyconfig.GetAdapter("caddyfile")
	f.Fuzz(func(t *testing.T, body string) {
		// `import` reads files (and globs): not what this target is
		// about, and it would make the fuzzer touch the disk.
		if strings.Contains(body, "import") {
			t.Skip()
		}
		input := ":8080 {\n\tsse news {\n" + body + "\n\t}\n}\n"
		out, _, err := adapter.Adapt([]byte(input), map[string]any{"filename": "Caddyfile"})
		if err != nil {
			return
		}
		var cfg any
		if err := json.Unmarshal(out, &cfg); err != nil {
			t.Fatalf("adapt succeeded with invalid JSON: %v\n%s", err, out)
		}
		// The body may close the block and add other directives; check
		// every sse handler that came out.
		for _, obj := range findHandlers(cfg, "sse") {
			b, _ := json.Marshal(obj)
			var h Handler
			if err := json.Unmarshal(b, &h); err != nil {
				t.Fatalf("sse handler JSON does not decode: %v\n%s", err, b)
			}
			if err := h.Validate(); err != nil {
				t.Fatalf("adapt accepted what Validate refuses: %v\ninput:\n%s\nhandler: %s", err, input, b)
			}
		}
	})
}

// findHandlers returns every handler object named name in the decoded JSON
// config v.
func findHandlers(v any, name string) []map[string]any {
	var found []map[string]any
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if v["handler"] == name {
				found = append(found, v)
			}
			for _, e := range v {
				walk(e)
			}
		case []any:
			for _, e := range v {
				walk(e)
			}
		}
	}
	walk(v)
	return found
}

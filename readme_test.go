package caddysse_test

import (
	"context"
	"encoding/json"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-sse/caddy-sse"
	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

var caddyfileBlock = regexp.MustCompile("(?s)```caddyfile\n(.*?)```")

// readmeCaddyfiles returns the README's Caddyfile examples, each made a
// whole Caddyfile on a loopback address; the syntax summaries (with <...>)
// are left out.
func readmeCaddyfiles(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range caddyfileBlock.FindAllStringSubmatch(string(b), -1) {
		block := m[1]
		if strings.Contains(block, "<") {
			continue
		}
		block = strings.ReplaceAll(block, "http://localhost:8000", "http://127.0.0.1:{HTTP}")
		if !strings.HasPrefix(block, "{") && !strings.HasPrefix(block, "http://") {
			block = "http://127.0.0.1:{HTTP} {\n\t" + strings.ReplaceAll(strings.TrimSpace(block), "\n", "\n\t") + "\n}\n"
		}
		out = append(out, block)
	}
	if len(out) < 5 {
		t.Fatalf("found %d Caddyfile examples in the README", len(out))
	}
	return out
}

// Every Caddyfile in the README adapts and validates as written.
func TestReadmeCaddyfilesValidate(t *testing.T) {
	for _, cf := range readmeCaddyfiles(t) {
		cf = strings.ReplaceAll(cf, "{HTTP}", "8000")
		adapted, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cf), map[string]any{"filename": "Caddyfile"})
		if err != nil {
			t.Fatalf("adapting:\n%s\n%v", cf, err)
		}
		for _, w := range warnings {
			t.Errorf("warning adapting:\n%s\n%v", cf, w)
		}
		var cfg caddy.Config
		if err := json.Unmarshal(adapted, &cfg); err != nil {
			t.Fatal(err)
		}
		cfg.Admin = &caddy.AdminConfig{Disabled: true}
		cfg.StorageRaw = json.RawMessage(`{"module":"file_system","root":` + quote(t.TempDir()) + `}`)
		if err := caddy.Validate(&cfg); err != nil {
			t.Fatalf("validating:\n%s\n%v", cf, err)
		}
	}
}

func quote(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// The README's protected sse_publish example refuses a request without
// credentials and publishes with them.
func TestReadmePublishExampleIsProtected(t *testing.T) {
	var example string
	for _, cf := range readmeCaddyfiles(t) {
		if strings.Contains(cf, "sse_publish") && strings.Contains(cf, "basic_auth") {
			example = cf
		}
	}
	if example == "" {
		t.Fatal("no protected sse_publish example in the README")
	}
	rs := redistest.Start(t)
	// The example relies on the default Redis URL, taken from REDIS_URL.
	cf := globalOptions + strings.Replace(example, "reverse_proxy 127.0.0.1:8080", `sse /events/* {
		channel {path.1}
		history 100
	}`, 1)
	in := caddyproc.Start(t, cf, nil, "REDIS_URL="+rs.URL())
	waitFunctions(t, rs.Client())
	s, err := sseclient.Get(context.Background(), in.URL()+"/events/news")
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	post := func(user, pass string) int {
		req, _ := http.NewRequest(http.MethodPost, in.URL()+"/publish/news", strings.NewReader("extra"))
		if user != "" {
			req.SetBasicAuth(user, pass)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := post("", ""); code != http.StatusUnauthorized {
		t.Fatalf("publish without credentials: %d, want 401", code)
	}
	if code := post("backend", "wrong"); code != http.StatusUnauthorized {
		t.Fatalf("publish with a wrong password: %d, want 401", code)
	}
	ssetest.NoEvent(t, s, 200*time.Millisecond)
	if code := post("backend", "change me"); code != http.StatusOK {
		t.Fatalf("publish with credentials: %d, want 200", code)
	}
	ssetest.Expect(t, s, "extra")
}

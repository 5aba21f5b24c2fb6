package presence

import (
	"encoding/base64"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-sse/caddy-sse/examples/internal/exampletest"
	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/outbuf"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

// startApp builds ./app and runs it as its doc comment says, with its
// address and Redis from the environment, until the test ends.
func startApp(t *testing.T, redisURL string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "app")
	if out, err := exec.Command("go", "build", "-o", bin, "./app").CombinedOutput(); err != nil {
		t.Fatalf("building ./app: %v\n%s", err, out)
	}
	addr := "127.0.0.1:" + strconv.Itoa(caddyproc.FreePort(t))
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "REDIS_URL="+redisURL, "LISTEN="+addr)
	logs := &outbuf.Buffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("app output:\n%s", logs.String())
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/")
		if err == nil {
			resp.Body.Close()
			return addr
		}
		if time.Now().After(deadline) {
			t.Fatalf("the app did not answer: %v\n%s", err, logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func basic(user, pass string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+pass))
}

func call(t *testing.T, method, url, body string) (int, string) {
	t.Helper()
	code, _, answer := ssetest.Do(t, method, url, body)
	return code, answer
}

type onlineAnswer struct {
	User    string `json:"user"`
	Online  bool   `json:"online"`
	Streams int64  `json:"streams"`
}

// waitOnline polls the app's /internal/online until it says want streams.
func waitOnline(t *testing.T, app, user string, want int64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		code, body := call(t, http.MethodGet, "http://"+app+"/internal/online?user="+user, "")
		var got onlineAnswer
		if code == http.StatusOK && json.Unmarshal([]byte(body), &got) == nil &&
			got.Streams == want && got.Online == (want > 0) && got.User == user {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("/internal/online?user=%s = %d %s, want %d streams", user, code, body, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestPresenceExample(t *testing.T) {
	caddyproc.SkipShort(t)
	rs := redistest.Start(t)
	app := startApp(t, rs.URL())
	cf := exampletest.Caddyfile(t, "Caddyfile",
		"http://localhost:8000", "http://127.0.0.1:{HTTP}",
		"redis://127.0.0.1:6379", rs.URL(),
		"reverse_proxy 127.0.0.1:8080", "reverse_proxy "+app,
	)
	in := caddyproc.Start(t, cf, nil)
	redistest.WaitLibrary(t, rs.Client(), "caddy_sse_presence")

	// alice is away: the app keeps what it has for her.
	waitOnline(t, app, "alice", 0)
	if code, body := call(t, http.MethodPost, "http://"+app+"/internal/notify?user=alice", "your report is ready"); code != 200 || body != "pending\n" {
		t.Fatalf("notify while offline: %d %q", code, body)
	}

	// She connects: the app learns it from the lifecycle stream and sends
	// a greeting and what was pending.
	if _, err := ssetest.TryOpen(in.URL()+"/events", 5*time.Second); err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("a stream without credentials: %v, want 401", err)
	}
	alice := ssetest.Open(t, in.URL()+"/events", "Authorization", basic("alice", "alice-secret"))
	if ev := ssetest.Next(t, alice); ev.Data != `{"text":"Welcome, alice"}` {
		t.Fatalf("alice got %+v, want the greeting", ev)
	}
	if ev := ssetest.Next(t, alice); ev.Data != `{"text":"your report is ready"}` {
		t.Fatalf("alice got %+v, want what was pending", ev)
	}
	waitOnline(t, app, "alice", 1)

	// A second tab: greeted too (on her channel, so both tabs see it).
	second := ssetest.Open(t, in.URL()+"/events", "Authorization", basic("alice", "alice-secret"))
	if ev := ssetest.Next(t, second); ev.Data != `{"text":"Welcome, alice"}` {
		t.Fatalf("the second stream got %+v, want its greeting", ev)
	}
	if ev := ssetest.Next(t, alice); ev.Data != `{"text":"Welcome, alice"}` {
		t.Fatalf("alice got %+v, want the second stream's greeting", ev)
	}
	waitOnline(t, app, "alice", 2)
	waitOnline(t, app, "bob", 0)

	// Online: delivered at once, to each of her streams.
	if code, body := call(t, http.MethodPost, "http://"+app+"/internal/notify?user=alice", "now"); code != 200 || body != "delivered\n" {
		t.Fatalf("notify while online: %d %q", code, body)
	}
	if ev := ssetest.Next(t, alice); ev.Data != `{"text":"now"}` {
		t.Fatalf("alice got %+v", ev)
	}
	if ev := ssetest.Next(t, second); ev.Data != `{"text":"now"}` {
		t.Fatalf("the second stream got %+v", ev)
	}

	alice.Close()
	second.Close()
	waitOnline(t, app, "alice", 0)

	// The app's internal API is not reachable through Caddy; its pages are.
	if code, _ := call(t, http.MethodGet, in.URL()+"/internal/online?user=alice", ""); code != http.StatusNotFound {
		t.Fatalf("GET /internal/online through Caddy: %d, want 404", code)
	}
	if code, body := call(t, http.MethodGet, in.URL()+"/dashboard", ""); code != 200 || body != "the app's page /dashboard\n" {
		t.Fatalf("GET /dashboard: %d %q", code, body)
	}
	if code, body := call(t, http.MethodGet, in.URL()+"/healthz", ""); code != 200 || !strings.Contains(body, `"status":"up"`) {
		t.Fatalf("GET /healthz: %d %q", code, body)
	}
}

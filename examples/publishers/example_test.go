package publishers

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/caddy-sse/caddy-sse/examples/internal/exampletest"
	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

// run runs a publisher as a user would, with REDIS_URL set, and returns
// its standard output.
func run(t *testing.T, redisURL string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "REDIS_URL="+redisURL)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %q: %v\n%s%s", name, args, err, stdout.String(), stderr.String())
	}
	return strings.TrimSpace(stdout.String())
}

func TestPublishersExample(t *testing.T) {
	caddyproc.SkipShort(t)
	exampletest.NeedBinary(t, "redis-cli", "apt-get install -y redis-tools")
	rs := redistest.Start(t)
	cf := exampletest.Caddyfile(t, "Caddyfile",
		"http://localhost:8000", "http://127.0.0.1:{HTTP}",
		"redis://127.0.0.1:6379", rs.URL(),
	)
	in := caddyproc.Start(t, cf, nil)
	redistest.WaitLibrary(t, rs.Client(), "caddy_sse")
	s := ssetest.Open(t, in.URL()+"/events/42")
	other := ssetest.Open(t, in.URL()+"/events/7")

	// The Go publisher, run exactly as its doc comment says.
	run(t, rs.URL(), "go", "run", "./go", "user:42", `{"text":"hello"}`)
	if ev := ssetest.Next(t, s); ev.Data != `{"text":"hello"}` || ev.ID != "" {
		t.Fatalf("go publisher: got %+v", ev)
	}
	goID := run(t, rs.URL(), "go", "run", "./go", "-r", "user:42", `{"text":"from Go"}`)
	if ev := ssetest.Next(t, s); ev.Data != `{"text":"from Go"}` || ev.ID != goID || goID == "" {
		t.Fatalf("go publisher -r printed %q; stream got %+v", goID, ev)
	}

	// The shell publisher, with redis-cli.
	if out := run(t, rs.URL(), "sh", "publish.sh", "user:42", "from the shell\nsecond line"); out != "" {
		t.Fatalf("publish.sh printed %q, want nothing", out)
	}
	// An event without an id leaves the client's last event id as it was.
	if ev := ssetest.Next(t, s); ev.Data != "from the shell\nsecond line" || ev.ID != goID {
		t.Fatalf("publish.sh: got %+v", ev)
	}
	shID := run(t, rs.URL(), "sh", "publish.sh", "-r", "user:42", `{"text":"resumable"}`)
	if ev := ssetest.Next(t, s); ev.Data != `{"text":"resumable"}` || ev.ID != shID || shID == "" {
		t.Fatalf("publish.sh -r printed %q; stream got %+v", shID, ev)
	}

	// What the browser received, byte for byte.
	want := ":\n" +
		"data: {\"text\":\"hello\"}\n\n" +
		"id: " + goID + "\ndata: {\"text\":\"from Go\"}\n\n" +
		"data: from the shell\ndata: second line\n\n" +
		"id: " + shID + "\ndata: {\"text\":\"resumable\"}\n\n"
	if got := s.Raw(); got != want {
		t.Fatalf("stream bytes:\n%q\nwant\n%q", got, want)
	}
	ssetest.NoEvent(t, other, 100*time.Millisecond)

	// Both resumable events are in the history: a client that was away
	// since the first event gets the rest.
	resumed := ssetest.Open(t, in.URL()+"/events/42", "Last-Event-ID", goID)
	if ev := ssetest.Next(t, resumed); ev.ID != shID {
		t.Fatalf("resume after %s: got %+v, want id %s", goID, ev, shID)
	}

	// Misuse is reported, not ignored.
	cmd := exec.Command("sh", "publish.sh", "only-a-channel")
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "usage") {
		t.Fatalf("publish.sh with one argument: %v %s", err, out)
	}
	cmd = exec.Command("sh", "publish.sh", "-r", "user:42", "x")
	cmd.Env = append(os.Environ(), "REDIS_URL=redis://127.0.0.1:1")
	if err := cmd.Run(); err == nil {
		t.Fatal("publish.sh with an unreachable Redis exited 0")
	}
}

// The snippets that cannot run here without their Redis libraries at least
// parse.
func TestPublisherSnippetsParse(t *testing.T) {
	caddyproc.SkipShort(t)
	node := exampletest.NeedBinary(t, "node", "apt-get install -y nodejs")
	if out, err := exec.Command(node, "--check", "publish.mjs").CombinedOutput(); err != nil {
		t.Fatalf("node --check publish.mjs: %v\n%s", err, out)
	}
	py := exampletest.NeedBinary(t, "python3", "apt-get install -y python3")
	// ast.parse writes no __pycache__ into the example.
	check := "import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])"
	if out, err := exec.Command(py, "-c", check, "publish.py").CombinedOutput(); err != nil {
		t.Fatalf("python3 parse publish.py: %v\n%s", err, out)
	}
	for _, f := range []string{"publish.php", "Publish.java"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{"user:42", "sse_publish", "publish"} {
			if !bytes.Contains(b, []byte(want)) {
				t.Fatalf("%s does not mention %q", f, want)
			}
		}
	}
}

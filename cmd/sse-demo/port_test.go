package main

import (
	"bytes"
	"errors"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/caddy-sse/caddy-sse/internal/outbuf"
)

// runMainEnv makes this test binary run the demo's main instead of the
// tests, so that a test can start demos as users do: each a process of its
// own, with its own flags, exit status and output.
const runMainEnv = "SSE_DEMO_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// demoCommand is the demo as a process: `sse-demo args...`.
func demoCommand(args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), runMainEnv+"=1")
	return cmd
}

// waitExit waits up to d for cmd to exit. It reports false, and kills cmd,
// if it is still running then.
func waitExit(cmd *exec.Cmd, done <-chan error, d time.Duration) (exited bool, err error) {
	select {
	case err := <-done:
		return true, err
	case <-time.After(d):
		_ = cmd.Process.Kill()
		<-done
		return false, nil
	}
}

// startDemoProcess runs a demo on listen and waits until it serves its page.
// The demo is stopped with Ctrl-C (SIGINT) when the test ends.
func startDemoProcess(t *testing.T, listen string) *outbuf.Buffer {
	t.Helper()
	cmd := demoCommand("-listen", listen)
	var out outbuf.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		if exited, _ := waitExit(cmd, done, 10*time.Second); !exited {
			t.Errorf("the demo on %s did not stop within 10s of Ctrl-C", listen)
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := client.Get("http://" + listen + "/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return &out
			}
		}
		select {
		case err := <-done:
			t.Fatalf("the demo exited before serving: %v\n%s", err, out.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("the demo did not serve GET / on %s within 60s:\n%s", listen, out.String())
		}
	}
}

// A second demo on the port of a first one refuses to start, saying which
// address is taken and which flag changes it. Caddy's listeners set
// SO_REUSEPORT, so without the demo's own check the second one would bind
// the same port and the kernel would split browsers between two demos, each
// with its own embedded Redis.
func TestSecondDemoOnTakenPortFails(t *testing.T) {
	listen := freeListen(t)
	first := startDemoProcess(t, listen)
	if !strings.Contains(first.String(), "Open:      http://"+listen+"/") {
		t.Fatalf("the first demo's banner lacks its address:\n%s", first.String())
	}

	second := demoCommand("-listen", listen)
	var out bytes.Buffer
	second.Stdout, second.Stderr = &out, &out
	if err := second.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- second.Wait() }()
	exited, err := waitExit(second, done, 60*time.Second)
	if !exited {
		t.Fatalf("a second demo on %s was still running after 60s (killed now); it printed:\n%s", listen, out.String())
	}
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Fatalf("a second demo on %s ended with %v, want exit status 1; it printed:\n%s", listen, err, out.String())
	}
	want := "sse-demo: " + listen + " is already in use (is another sse-demo running?): choose another address with -listen"
	if !strings.Contains(out.String(), want) {
		t.Errorf("a second demo on %s printed:\n%s\nwant a line with %q", listen, out.String(), want)
	}
	if strings.Contains(out.String(), "Open:") {
		t.Errorf("the second demo printed its banner before failing:\n%s", out.String())
	}

	// The first one goes on serving, alone on its port: every connection
	// reaches it.
	for i := range 5 {
		resp, err := client.Get("http://" + listen + "/")
		if err != nil {
			t.Fatalf("GET / #%d after the second demo failed: %v", i, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET / #%d after the second demo failed: status %d", i, resp.StatusCode)
		}
	}
}

// A port held by some other program is refused the same way, before the
// demo starts anything.
func TestDemoOnPortOfAnotherProgramFails(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	listen := l.Addr().String()
	var banner strings.Builder
	d, err := start(options{Listen: listen, Out: &banner})
	if err == nil {
		_ = d.stop()
		t.Fatalf("the demo started on %s, which another listener holds", listen)
	}
	for _, want := range []string{listen + " is already in use", "-listen"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	if banner.Len() > 0 {
		t.Errorf("the demo printed its banner:\n%s", banner.String())
	}
}

// By default the demo listens on 127.0.0.1:8090, not on the 8080 that the
// README's quick start gives the user's own app.
func TestDefaultListen(t *testing.T) {
	out, err := demoCommand("-print-caddyfile").CombinedOutput()
	if err != nil {
		t.Fatalf("sse-demo -print-caddyfile: %v\n%s", err, out)
	}
	for _, want := range []string{"http://:8090 {", "bind 127.0.0.1"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("sse-demo -print-caddyfile lacks %q:\n%s", want, out)
		}
	}
}

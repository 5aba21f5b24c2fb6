// Package caddyproc runs real Caddy processes, built from this repository's
// cmd/caddy, for end-to-end tests: Caddyfiles in, HTTP over loopback out.
// Such tests are skipped under `go test -short`.
package caddyproc

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-sse/caddy-sse/internal/outbuf"
)

// built holds a build per package and flags, made once per test process.
var (
	builtMu sync.Mutex
	built   = map[string]*build{}
)

type build struct {
	once sync.Once
	dir  string
	path string
	err  error
}

// GlobalOptions is the global options block of a test Caddyfile: it keeps
// the instance on loopback, on its own admin port, and away from the
// user's trust store and saved config.
const GlobalOptions = `{
	admin 127.0.0.1:{ADMIN}
	default_bind 127.0.0.1
	auto_https off
	skip_install_trust
	persist_config off
}
`

// SkipShort skips, under `go test -short`, a test that runs processes
// (Caddy, Redis clusters, apps, browsers, scripts). Binary does it for every
// test that runs Caddy; a test that starts other processes first calls it
// before them.
func SkipShort(tb testing.TB) {
	tb.Helper()
	if testing.Short() {
		tb.Skip("runs processes; skipped with -short")
	}
}

// Binary builds cmd/caddy once per test process (with the race detector when
// the tests run with it) and returns its path. Under `go test -short` it
// skips the test instead: tests that run Caddy processes are integration
// tests, left out of the quick inner loop.
func Binary(tb testing.TB) string {
	tb.Helper()
	SkipShort(tb)
	if raceEnabled {
		return Build(tb, "./cmd/caddy", "-race")
	}
	return Build(tb, "./cmd/caddy")
}

// Build builds the main package pkg of this module (such as
// "./cmd/sse-demo") with the go build flags given, once per test process,
// and returns the binary's path. RemoveBuilt deletes what it built.
func Build(tb testing.TB, pkg string, flags ...string) string {
	tb.Helper()
	key := strings.Join(append([]string{pkg}, flags...), " ")
	builtMu.Lock()
	b := built[key]
	if b == nil {
		b = &build{}
		built[key] = b
	}
	builtMu.Unlock()
	b.once.Do(func() {
		b.dir, b.err = os.MkdirTemp("", "caddy-sse-bin")
		if b.err != nil {
			return
		}
		b.path = filepath.Join(b.dir, filepath.Base(pkg))
		args := append(append([]string{"build", "-o", b.path}, flags...), pkg)
		cmd := exec.Command("go", args...)
		cmd.Dir = moduleRoot()
		if out, err := cmd.CombinedOutput(); err != nil {
			b.err = fmt.Errorf("building %s: %v\n%s", pkg, err, out)
		}
	})
	if b.err != nil {
		tb.Fatal(b.err)
	}
	return b.path
}

// Main runs a package's tests and then removes the binaries Build made:
// what a TestMain of a package using Build calls.
func Main(m *testing.M) {
	code := m.Run()
	RemoveBuilt()
	os.Exit(code)
}

// RemoveBuilt deletes the binaries Build made.
func RemoveBuilt() {
	builtMu.Lock()
	defer builtMu.Unlock()
	for _, b := range built {
		if b.dir != "" {
			_ = os.RemoveAll(b.dir)
		}
	}
}

func moduleRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort(tb testing.TB) int {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Instance is one running Caddy process.
type Instance struct {
	tb        testing.TB
	cmd       *exec.Cmd
	dir       string
	AdminPort int
	HTTPPort  int
	logs      *outbuf.Buffer
	done      chan struct{}
}

// Options are the placeholders a test Caddyfile may use besides {HTTP} and
// {ADMIN}: each key is replaced by its value.
type Options map[string]string

// Start writes caddyfile (with {HTTP} and {ADMIN} replaced by free ports and
// every key of vars by its value) and runs `caddy run` on it. It waits until
// the admin endpoint answers and stops the process at test cleanup.
func Start(tb testing.TB, caddyfile string, vars Options, env ...string) *Instance {
	tb.Helper()
	// A free port can be taken by another process between the check and
	// Caddy's bind: try again with new ports.
	for attempt := 1; ; attempt++ {
		in, err := start(tb, caddyfile, vars, env)
		if err == nil {
			return in
		}
		if !strings.Contains(err.Error(), "address already in use") || attempt == 5 {
			tb.Fatal(err)
		}
	}
}

func start(tb testing.TB, caddyfile string, vars Options, env []string) (*Instance, error) {
	bin := Binary(tb)
	in := &Instance{
		tb:        tb,
		dir:       tb.TempDir(),
		AdminPort: FreePort(tb),
		HTTPPort:  FreePort(tb),
		logs:      &outbuf.Buffer{},
		done:      make(chan struct{}),
	}
	path := filepath.Join(in.dir, "Caddyfile")
	if err := os.WriteFile(path, []byte(in.Expand(caddyfile, vars)), 0o600); err != nil {
		return nil, err
	}
	in.cmd = exec.Command(bin, "run", "--config", path, "--adapter", "caddyfile")
	in.cmd.Dir = in.dir
	in.cmd.Env = append(append(os.Environ(), "HOME="+in.dir, "XDG_DATA_HOME="+in.dir, "XDG_CONFIG_HOME="+in.dir), env...)
	in.cmd.Stdout = in.logs
	in.cmd.Stderr = in.logs
	if err := in.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		_ = in.cmd.Wait()
		close(in.done)
	}()
	if err := in.waitReady(); err != nil {
		in.cleanup()
		return nil, err
	}
	tb.Cleanup(in.cleanup)
	return in, nil
}

// Expand replaces {HTTP}, {ADMIN} and the keys of vars in a Caddyfile.
func (in *Instance) Expand(caddyfile string, vars Options) string {
	s := strings.ReplaceAll(caddyfile, "{HTTP}", fmt.Sprint(in.HTTPPort))
	s = strings.ReplaceAll(s, "{ADMIN}", fmt.Sprint(in.AdminPort))
	for k, v := range vars {
		s = strings.ReplaceAll(s, k, v)
	}
	return s
}

func (in *Instance) waitReady() error {
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-in.done:
			return fmt.Errorf("caddy exited early:\n%s", in.logs.String())
		default:
		}
		resp, err := http.Get(in.AdminURL() + "/config/")
		if err == nil {
			resp.Body.Close()
			if c, err := net.DialTimeout("tcp", in.Addr(), time.Second); err == nil {
				c.Close()
				return nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("caddy did not become ready:\n%s", in.logs.String())
}

// Addr is the host:port of the HTTP server.
func (in *Instance) Addr() string { return fmt.Sprintf("127.0.0.1:%d", in.HTTPPort) }

// URL is the base URL of the HTTP server.
func (in *Instance) URL() string { return "http://" + in.Addr() }

// AdminURL is the base URL of the admin endpoint.
func (in *Instance) AdminURL() string { return fmt.Sprintf("http://127.0.0.1:%d", in.AdminPort) }

// Pid is the Caddy process's id, for reading its memory use.
func (in *Instance) Pid() int { return in.cmd.Process.Pid }

// Logs returns what the process has printed so far.
func (in *Instance) Logs() string { return in.logs.String() }

// Reload loads a new Caddyfile through the admin API, as `caddy reload` does.
func (in *Instance) Reload(caddyfile string, vars Options) error {
	body := in.Expand(caddyfile, vars)
	req, err := http.NewRequest(http.MethodPost, in.AdminURL()+"/load", strings.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "text/caddyfile")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("reload: %s: %s", resp.Status, msg)
	}
	return nil
}

// Stop asks Caddy to exit through the admin API and waits up to timeout for
// the process to end; it reports how long that took.
func (in *Instance) Stop(timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	resp, err := http.Post(in.AdminURL()+"/stop", "", nil)
	if err == nil {
		resp.Body.Close()
	}
	select {
	case <-in.done:
		return time.Since(start), nil
	case <-time.After(timeout):
		return time.Since(start), fmt.Errorf("caddy did not exit within %v", timeout)
	}
}

// Kill ends the process with SIGKILL, as a crash or an OOM kill would:
// nothing of it runs any more, no cleanup included. It waits for the exit.
func (in *Instance) Kill() {
	_ = in.cmd.Process.Kill()
	<-in.done
}

func (in *Instance) cleanup() {
	select {
	case <-in.done:
	default:
		_ = in.cmd.Process.Signal(os.Interrupt)
		select {
		case <-in.done:
		case <-time.After(5 * time.Second):
			_ = in.cmd.Process.Kill()
			<-in.done
		}
	}
	if logs := in.logs.String(); strings.Contains(logs, "WARNING: DATA RACE") || strings.Contains(logs, "panic:") {
		in.tb.Errorf("caddy reported a data race or panic:\n%s", logs)
	}
}

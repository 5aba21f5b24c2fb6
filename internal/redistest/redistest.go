// Package redistest starts real redis-server processes for tests. There is
// no fake Redis on purpose: what the broker must get right (confirmation of
// subscriptions, reconnects, functions lost on restart) is server behaviour.
package redistest

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/internal/outbuf"
)

// startTimeout bounds how long a server may take to answer PING.
const startTimeout = 10 * time.Second

// Server is one redis-server process listening on 127.0.0.1.
type Server struct {
	tb   testing.TB
	port int
	conf string // a config file put first on the command line, if any
	args []string
	dir  string

	mu       sync.Mutex
	cmd      *exec.Cmd
	exited   chan struct{}
	client   *redis.Client
	sentinel *redis.SentinelClient // for a Sentinel process
	stopped  bool
}

// Start starts a redis-server on a free port of 127.0.0.1, without
// persistence, with args appended to its command line, and waits until it
// answers PING. The server is stopped when the test ends. Start fails the
// test when redis-server is not installed: these tests must not pass by
// skipping.
func Start(tb testing.TB, args ...string) *Server {
	tb.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		tb.Fatalf("redistest: redis-server not found on PATH (%v): install Redis 7 or later (for example `apt-get install redis-server` or `brew install redis`) to run these tests", err)
	}
	s := &Server{tb: tb, args: args, dir: tb.TempDir()}
	return s.launch(nil)
}

// launch starts s on a fresh free port, retrying a few times: the port is
// found by binding and releasing it, so another process may take it in
// between. prepare, if set, runs before each attempt with the port chosen
// (to write a config file that names it).
func (s *Server) launch(prepare func(port int) error) *Server {
	s.tb.Helper()
	s.tb.Cleanup(s.cleanup)
	var err error
	for range 5 {
		if s.port, err = freePort(); err != nil {
			s.tb.Fatalf("redistest: find a free port: %v", err)
		}
		if prepare != nil {
			if err = prepare(s.port); err != nil {
				s.tb.Fatalf("redistest: %v", err)
			}
		}
		if err = s.start(); err == nil {
			return s
		}
	}
	s.tb.Fatalf("redistest: %v", err)
	return nil
}

// Port is the server's TCP port.
func (s *Server) Port() int { return s.port }

// Addr is the server's host:port.
func (s *Server) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)) }

// URL is the server's redis:// URL.
func (s *Server) URL() string { return "redis://" + s.Addr() }

// Client returns a client of the server for assertions, created on first use
// and closed when the test ends. It survives Stop and Restart (go-redis
// redials).
func (s *Server) Client() *redis.Client {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.client == nil {
		s.client = redis.NewClient(&redis.Options{Addr: s.Addr()})
	}
	return s.client
}

// Stop kills the server (SIGKILL, no shutdown) and waits for it to exit, to
// simulate an outage. Stopping a stopped server does nothing.
func (s *Server) Stop() {
	s.tb.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopLocked()
}

// Restart starts the server again on the same port with the same arguments
// and waits until it answers PING. Without persistence the data set, and the
// functions loaded, are gone. A running server is stopped first.
func (s *Server) Restart() {
	s.tb.Helper()
	s.mu.Lock()
	s.stopLocked()
	s.mu.Unlock()
	var err error
	// The old process's port can linger for a moment; retry briefly.
	for range 5 {
		if err = s.start(); err == nil {
			return
		}
	}
	s.tb.Fatalf("redistest: restart: %v", err)
}

func (s *Server) stopLocked() {
	if s.cmd == nil || s.stopped {
		return
	}
	s.stopped = true
	_ = s.cmd.Process.Kill()
	<-s.exited
}

// start launches the process and waits for PING; on failure the process is
// gone and the error carries its output.
func (s *Server) start() error {
	var argv []string
	if s.conf != "" {
		argv = append(argv, s.conf)
	}
	argv = append(argv,
		"--port", strconv.Itoa(s.port),
		"--bind", "127.0.0.1",
		"--save", "",
		"--appendonly", "no",
		"--dir", s.dir,
	)
	argv = append(argv, s.args...)
	cmd := exec.Command("redis-server", argv...)
	out := &outbuf.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start redis-server: %w", err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()

	if err := waitPing(s.Addr(), exited); err != nil {
		_ = cmd.Process.Kill()
		<-exited
		return fmt.Errorf("redis-server %v: %w\n%s", argv, err, out.String())
	}
	s.mu.Lock()
	s.cmd, s.exited, s.stopped = cmd, exited, false
	s.mu.Unlock()
	return nil
}

func (s *Server) cleanup() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.client != nil {
		_ = s.client.Close()
		s.client = nil
	}
	if s.sentinel != nil {
		_ = s.sentinel.Close()
		s.sentinel = nil
	}
	s.stopLocked()
}

// waitPing polls addr with PING until it answers PONG, the process exits or
// startTimeout passes.
func waitPing(addr string, exited <-chan struct{}) error {
	deadline := time.Now().Add(startTimeout)
	for {
		if err := ping(addr); err == nil {
			return nil
		} else if time.Now().After(deadline) {
			return fmt.Errorf("no answer to PING on %s within %s: %w", addr, startTimeout, err)
		}
		select {
		case <-exited:
			return fmt.Errorf("exited before answering PING on %s", addr)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// ping speaks RESP by hand: a go-redis client would log its dial failures
// while the server is still starting.
func ping(addr string) error {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := conn.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "+PONG\r\n" {
		return fmt.Errorf("PING answered %q", line)
	}
	return nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// WaitLibrary waits until a Redis function library of that name is loaded,
// as a Caddy with history loads caddy_sse in the background when it starts.
func WaitLibrary(tb testing.TB, rdb *redis.Client, name string) {
	tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		libs, err := rdb.FunctionList(context.Background(), redis.FunctionListQuery{LibraryNamePattern: name}).Result()
		if err == nil && len(libs) == 1 {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("redistest: function library %s was not loaded: %v", name, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// AddUser creates the ACL user name, enabled, with password and the ACL
// rules given (such as "~*", "&news:*", "+@all"), and returns the server's
// redis:// URL that logs in as it.
func (s *Server) AddUser(tb testing.TB, name, password string, rules ...string) string {
	tb.Helper()
	args := []any{"ACL", "SETUSER", name, "on", ">" + password}
	for _, r := range rules {
		args = append(args, r)
	}
	if err := s.Client().Do(context.Background(), args...).Err(); err != nil {
		tb.Fatalf("redistest: ACL SETUSER %s: %v", name, err)
	}
	return "redis://" + name + ":" + password + "@" + s.Addr()
}

// IsRunning reports whether the server's process runs (it was not
// stopped, or was restarted since).
func (s *Server) IsRunning() bool { return s.running() }

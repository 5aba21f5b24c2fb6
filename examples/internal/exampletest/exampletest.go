// Package exampletest runs the shipped example files in tests: it reads an
// example's Caddyfile, swaps its addresses for the test's, and adds the
// global options a test instance needs, so that what runs is the shipped
// file and not a copy of it.
package exampletest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/outbuf"
)

// testGlobals keep a test instance on loopback, on its own admin port, and
// away from the machine's trust store and saved config. Options the shipped
// file sets itself are left to it.
var testGlobals = []struct{ name, line string }{
	{"admin", "admin 127.0.0.1:{ADMIN}"},
	{"default_bind", "default_bind 127.0.0.1"},
	{"persist_config", "persist_config off"},
	{"skip_install_trust", "skip_install_trust"},
}

// Caddyfile reads the file at path and replaces each old string of
// replacements (pairs: old, new, ...) by its new one. Every old string must
// occur in the file: a test that no longer matches the shipped file fails
// instead of silently testing something else. Then it adds the test's global
// options (see testGlobals) to the file's global block, or a new one.
func Caddyfile(tb testing.TB, path string, replacements ...string) string {
	tb.Helper()
	s := Substitute(tb, path, replacements...)
	return WithTestGlobals(s)
}

// Substitute reads the file at path and applies replacements as Caddyfile
// does, without adding global options.
func Substitute(tb testing.TB, path string, replacements ...string) string {
	tb.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		tb.Fatalf("reading the shipped %s: %v", path, err)
	}
	if len(replacements)%2 != 0 {
		tb.Fatalf("exampletest: odd number of replacement strings")
	}
	s := string(b)
	for i := 0; i < len(replacements); i += 2 {
		old, repl := replacements[i], replacements[i+1]
		if !strings.Contains(s, old) {
			tb.Fatalf("the shipped %s no longer contains %q: update the test with the file", path, old)
		}
		s = strings.ReplaceAll(s, old, repl)
	}
	return s
}

var globalBlock = regexp.MustCompile(`^(?:\s*#[^\n]*\n|\s*\n)*\{\s*\n`)

// WithTestGlobals adds the test's global options to a Caddyfile.
func WithTestGlobals(s string) string {
	loc := globalBlock.FindStringIndex(s)
	body := ""
	end := 0
	if loc != nil {
		end = loc[1]
		// The global block ends at the first line that is a lone "}".
		if i := strings.Index(s[end:], "\n}"); i >= 0 {
			body = s[end : end+i]
		}
	}
	var add strings.Builder
	for _, g := range testGlobals {
		if regexp.MustCompile(`(?m)^\s*` + g.name + `\b`).MatchString(body) {
			continue
		}
		add.WriteString("\t" + g.line + "\n")
	}
	if loc == nil {
		return "{\n" + add.String() + "}\n\n" + s
	}
	return s[:end] + add.String() + s[end:]
}

// NeedBinary fails the test, with the command that installs it, when name
// is not on PATH. These tests never skip.
func NeedBinary(tb testing.TB, name, install string) string {
	tb.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		tb.Fatalf("%s not found on PATH: install it with `%s`", name, install)
	}
	return p
}

var readmeShellBlock = regexp.MustCompile("(?s)```sh\n(.*?)```")

// ReadmeCommands returns the commands of the shell blocks of the README at
// path, one a line, without their comments and without a trailing "&".
func ReadmeCommands(tb testing.TB, path string) []string {
	tb.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	var cmds []string
	for _, m := range readmeShellBlock.FindAllStringSubmatch(string(b), -1) {
		for _, line := range strings.Split(m[1], "\n") {
			// A comment starts with " #": a # inside an argument
			// (none in these READMEs) is not preceded by a space.
			if i := strings.Index(line, " #"); i >= 0 {
				line = line[:i]
			}
			line = strings.TrimSuffix(strings.TrimSpace(line), "&")
			if line = strings.TrimSpace(line); line != "" {
				cmds = append(cmds, line)
			}
		}
	}
	return cmds
}

// StandIn runs command, a line of a README that starts a stand-in for the
// user's app on 127.0.0.1:8080 with ./caddy, through sh as a user's shell
// would, with Caddy built from cmd/caddy (caddyproc.Binary) and on a free
// loopback port instead. It returns the address once something listens
// there, and stops the process when the test ends.
func StandIn(tb testing.TB, command string) string {
	tb.Helper()
	caddy := caddyproc.Binary(tb)
	addr := fmt.Sprintf("127.0.0.1:%d", caddyproc.FreePort(tb))
	if !strings.HasPrefix(command, "./caddy ") || !strings.Contains(command, "127.0.0.1:8080") {
		tb.Fatalf("%q does not start ./caddy on 127.0.0.1:8080", command)
	}
	line := strings.Replace(command, "./caddy", "exec '"+caddy+"'", 1)
	line = strings.ReplaceAll(line, "127.0.0.1:8080", addr)
	cmd := exec.Command("sh", "-c", line)
	cmd.Env = append(os.Environ(), "HOME="+tb.TempDir())
	Serve(tb, cmd, addr, 30*time.Second, nil)
	return addr
}

// Serve starts cmd, stops it when the test ends (an interrupt, then a kill
// after 5 s), and returns once something listens on addr. It fails the test
// with cmd's output, and what logs returns (when not nil), if cmd exits
// first or nothing listens within the given time.
func Serve(tb testing.TB, cmd *exec.Cmd, addr string, within time.Duration, logs func() string) {
	tb.Helper()
	var out outbuf.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	tb.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	name := strings.Join(cmd.Args, " ")
	deadline := time.Now().Add(within)
	for {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return
		}
		select {
		case <-done:
			more := ""
			if logs != nil {
				more = logs()
			}
			tb.Fatalf("%s exited:\n%s%s", name, out.String(), more)
		default:
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%s did not listen on %s within %s", name, addr, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Package examples holds only this test: it checks that every example's
// README says how to get what its commands assume.
package examples

import (
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/caddy-sse/caddy-sse/examples/internal/exampletest"
)

// exampleDirs returns the example folders.
func exampleDirs(t *testing.T) []string {
	t.Helper()
	entries, err := os.ReadDir(".")
	if err != nil {
		t.Fatal(err)
	}
	var dirs []string
	for _, e := range entries {
		if e.IsDir() && e.Name() != "internal" {
			dirs = append(dirs, e.Name())
		}
	}
	if len(dirs) == 0 {
		t.Fatal("no example folders")
	}
	return dirs
}

var (
	// envAssignments are the NAME=value words before a command.
	envAssignments = regexp.MustCompile(`^(?:[A-Z_]+=\S*\s+)*`)
	configFlag     = regexp.MustCompile(`--config (\S+)`)
)

// Every example's commands can be run as written from the root of a
// checkout: Caddy is ./caddy, built by a command of the same README (go
// build, or xcaddy in examples/xcaddy), or go run ./cmd/caddy, never a caddy
// assumed to be on PATH; every --config
// names a file that exists; and an example whose Caddyfile proxies to an
// app on 127.0.0.1:8080 says how to have one there.
func TestReadmesSayHowToGetCaddyAndTheApp(t *testing.T) {
	for _, dir := range exampleDirs(t) {
		readme := filepath.Join(dir, "README.md")
		cmds := exampletest.ReadmeCommands(t, readme)
		built := false
		for _, c := range cmds {
			if c == "go build -o caddy ./cmd/caddy" || strings.HasPrefix(c, "xcaddy build ") {
				built = true
			}
			words := strings.Fields(envAssignments.ReplaceAllString(c, ""))
			if len(words) == 0 {
				continue
			}
			switch words[0] {
			case "caddy":
				t.Errorf("%s: %q assumes a caddy on PATH: use ./caddy, built with go build -o caddy ./cmd/caddy", readme, c)
			case "./caddy":
				if !built {
					t.Errorf("%s: %q runs ./caddy before the README builds it (go build -o caddy ./cmd/caddy)", readme, c)
				}
			}
			if m := configFlag.FindStringSubmatch(c); m != nil {
				if _, err := os.Stat(filepath.Join("..", m[1])); err != nil {
					t.Errorf("%s: %q: no %s from the root of the checkout", readme, c, m[1])
				}
			}
		}

		caddyfiles, _ := filepath.Glob(filepath.Join(dir, "*Caddyfile"))
		needsApp := false
		for _, f := range caddyfiles {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(string(b), " 127.0.0.1:8080") {
				needsApp = true
			}
		}
		if !needsApp {
			continue
		}
		// The example's own app (ai-typewriter's listens there by
		// default), or a command that starts something there.
		if _, err := os.Stat(filepath.Join(dir, "app")); err == nil {
			continue
		}
		found := false
		for _, c := range cmds {
			if strings.Contains(c, "--listen 127.0.0.1:8080") {
				found = true
			}
		}
		if !found {
			t.Errorf("%s: its Caddyfile proxies to 127.0.0.1:8080, and no command starts an app there", readme)
		}
	}
}

var (
	statusFlag = regexp.MustCompile(`--status (\d+)`)
	headerFlag = regexp.MustCompile(`--header '([^':]+): ([^']*)'`)
	bodyArg    = regexp.MustCompile(`^\./caddy respond --listen \S+ '([^']*)'$`)
)

// Each stand-in app the READMEs give (./caddy respond on 127.0.0.1:8080)
// runs as written and answers what it says: its status, its headers, its
// body, on any path (/auth/sse included, for forward_auth).
func TestReadmeStandInApps(t *testing.T) {
	n := 0
	for _, dir := range exampleDirs(t) {
		for _, c := range exampletest.ReadmeCommands(t, filepath.Join(dir, "README.md")) {
			if !strings.HasPrefix(c, "./caddy respond ") {
				continue
			}
			n++
			t.Run(dir, func(t *testing.T) {
				addr := exampletest.StandIn(t, c)
				want := http.StatusOK
				if m := statusFlag.FindStringSubmatch(c); m != nil {
					want, _ = strconv.Atoi(m[1])
				}
				for _, path := range []string{"/", "/auth/sse"} {
					resp, err := http.Get("http://" + addr + path)
					if err != nil {
						t.Fatal(err)
					}
					body, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					if resp.StatusCode != want {
						t.Errorf("%s: GET %s = %d, want %d", c, path, resp.StatusCode, want)
					}
					for _, h := range headerFlag.FindAllStringSubmatch(c, -1) {
						if got := resp.Header.Get(h[1]); got != h[2] {
							t.Errorf("%s: GET %s: %s %q, want %q", c, path, h[1], got, h[2])
						}
					}
					if m := bodyArg.FindStringSubmatch(c); m != nil && string(body) != m[1] {
						t.Errorf("%s: GET %s: body %q, want %q", c, path, body, m[1])
					}
				}
			})
		}
	}
	if n == 0 {
		t.Fatal("no README gives a stand-in app")
	}
}

package caddysse_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// These tests hold the README's setup to what works: the commands it gives
// are the ones CI runs (.ci/run, examples/xcaddy/check.sh), and the versions
// it names are the ones the packages declare.

// docsRead returns the content of a file of the repository.
func docsRead(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// docsSection returns the section of a Markdown document that starts with
// the heading line (as "## Development"), up to the next heading of the same
// or a higher level outside a code block.
func docsSection(t *testing.T, doc, heading string) string {
	t.Helper()
	level := strings.IndexByte(heading, ' ')
	lines := strings.Split(doc, "\n")
	for i, line := range lines {
		if line != heading {
			continue
		}
		fenced := false
		for j := i + 1; j < len(lines); j++ {
			l := lines[j]
			if strings.HasPrefix(l, "```") {
				fenced = !fenced
			}
			if k := strings.IndexByte(l, ' '); !fenced && k > 0 && k <= level && strings.Trim(l[:k], "#") == "" {
				return strings.Join(lines[i+1:j], "\n")
			}
		}
		return strings.Join(lines[i+1:], "\n")
	}
	t.Fatalf("no section %q", heading)
	return ""
}

var docsShellBlock = regexp.MustCompile("(?s)```sh\n(.*?)```")

// docsCommands returns the commands of each shell block of text, one slice
// per block, without comments or blank lines.
func docsCommands(text string) [][]string {
	var blocks [][]string
	for _, m := range docsShellBlock.FindAllStringSubmatch(text, -1) {
		var cmds []string
		for _, line := range strings.Split(m[1], "\n") {
			if i := strings.Index(line, "#"); i >= 0 {
				line = line[:i]
			}
			if line = strings.TrimSpace(line); line != "" {
				cmds = append(cmds, line)
			}
		}
		blocks = append(blocks, cmds)
	}
	return blocks
}

// The README's build with xcaddy is the form that works from a checkout, the
// one examples/xcaddy/check.sh runs in CI; the published form comes after
// it, marked as waiting for a published version. The same holds for
// examples/xcaddy's README.
func TestReadmeInstallCommands(t *testing.T) {
	check := docsRead(t, "examples/xcaddy/check.sh")
	m := regexp.MustCompile(`(?m)^with="([^"]+)"$`).FindStringSubmatch(check)
	if m == nil {
		t.Fatal(`examples/xcaddy/check.sh has no line with="..." naming the --with it builds`)
	}
	checkout := "xcaddy build --with " + m[1]
	if !strings.HasSuffix(m[1], "=.") {
		t.Errorf("check.sh builds --with %s, which is not this checkout (=.)", m[1])
	}
	published := "xcaddy build --with github.com/caddy-sse/caddy-sse"
	if !regexp.MustCompile(`(?m)^if ! \(cd "\$root" && "\$xcaddy" build --with "\$with" `).MatchString(check) {
		t.Error(`check.sh no longer runs "$xcaddy" build --with "$with" from the checkout's root`)
	}
	if !strings.Contains(docsRead(t, ".ci/run"), "\nbash examples/xcaddy/check.sh\n") {
		t.Error(".ci/run no longer runs examples/xcaddy/check.sh")
	}

	readme := docsRead(t, "README.md")
	for _, doc := range []struct{ name, text string }{
		{"README.md, section \"With a real Redis\"", docsSection(t, readme, "## With a real Redis")},
		{"examples/xcaddy/README.md", docsRead(t, "examples/xcaddy/README.md")},
	} {
		var xcaddy []string
		for _, block := range docsCommands(doc.text) {
			for _, c := range block {
				if strings.HasPrefix(c, "xcaddy build") {
					xcaddy = append(xcaddy, c)
				}
			}
		}
		if len(xcaddy) != 2 || xcaddy[0] != checkout || xcaddy[1] != published {
			t.Errorf("%s: xcaddy commands %q, want %q (what check.sh builds) then %q", doc.name, xcaddy, checkout, published)
		}
		if !strings.Contains(doc.text, "Once the module is tagged and published") {
			t.Errorf("%s does not say that %q waits for the module to be published", doc.name, published)
		}
	}
	if blocks := docsCommands(docsSection(t, readme, "## With a real Redis")); len(blocks) == 0 || len(blocks[0]) != 1 || blocks[0][0] != "go build -o caddy ./cmd/caddy" {
		t.Errorf("the README's first build command is not go build -o caddy ./cmd/caddy: %q", blocks)
	}
}

// The README's setup is two commands, one for the demo and one for the whole
// test suite, and .ci/run runs the tests with the command the README gives.
func TestReadmeSetupIsTwoCommands(t *testing.T) {
	dev := docsSection(t, docsRead(t, "README.md"), "## Development")
	blocks := docsCommands(dev)
	want := []string{"go run ./cmd/sse-demo", "bash .ci/run"}
	if len(blocks) < 2 || strings.Join(blocks[0], "\n") != strings.Join(want, "\n") {
		t.Fatalf("the Development section's first commands are %q, want %q", blocks, want)
	}
	const testCmd = "go test -race -count=1 -timeout 18m ./..."
	if len(blocks[1]) != 1 || blocks[1][0] != testCmd {
		t.Errorf("the Development section's test command is %q, want %q", blocks[1], testCmd)
	}
	ci := docsRead(t, ".ci/run")
	if !strings.Contains(ci, "\n"+testCmd+"\n") {
		t.Errorf(".ci/run does not run %q on a line of its own", testCmd)
	}
	// What the README says .ci/run installs, it installs.
	for _, pkg := range []string{"redis-server", "nginx", "chromium", "python3", "nodejs", "npm"} {
		if !strings.Contains(ci, "missing+=("+pkg+")") {
			t.Errorf(".ci/run does not install %s", pkg)
		}
		if !strings.Contains(dev, "`"+pkg+"`") {
			t.Errorf("the Development section does not list %s among what .ci/run installs", pkg)
		}
	}
	for _, dir := range []string{"test/clients", "examples/ai-typewriter"} {
		if !strings.Contains(ci, dir) || !strings.Contains(dev, "`"+dir+"`") {
			t.Errorf(".ci/run and the README do not both install the npm packages of %s", dir)
		}
	}
	for _, tool := range []string{"staticcheck", "xcaddy"} {
		if !strings.Contains(ci, "go install") || !strings.Contains(ci, "/cmd/"+tool+"@") {
			t.Errorf(".ci/run does not go install %s", tool)
		}
	}

	try := docsSection(t, docsRead(t, "README.md"), "## Try it in a minute (only Go needed)")
	if !strings.Contains(try, "<http://127.0.0.1:8090/>") || strings.Contains(try, "8080") {
		t.Error("the README's demo section does not give the demo's address, http://127.0.0.1:8090/ (8080 is the app's)")
	}
}

// Every example folder is in the README's table of examples.
func TestReadmeListsEveryExample(t *testing.T) {
	section := docsSection(t, docsRead(t, "README.md"), "## Examples")
	entries, err := os.ReadDir("examples")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range entries {
		if !e.IsDir() || e.Name() == "internal" {
			continue
		}
		n++
		row := "| [" + e.Name() + "](examples/" + e.Name() + ") | "
		if !strings.Contains(section, "\n"+row) {
			t.Errorf("the README's table of examples has no row %q", row)
		}
		if _, err := os.Stat(filepath.Join("examples", e.Name(), "README.md")); err != nil {
			t.Errorf("examples/%s has no README.md", e.Name())
		}
	}
	if n == 0 {
		t.Fatal("no example folders")
	}
}

// The Node.js version the READMEs give is the one test/clients declares in
// its engines, which .ci/run enforces. An npm package the Node-driven tests
// install that declares a newer Node.js is named, with that version, in
// test/clients/README.md, which says why it is used anyway: a new one
// fails here until it is.
func TestNodeVersionAgrees(t *testing.T) {
	var pkg struct {
		Engines struct{ Node string } `json:"engines"`
	}
	if err := json.Unmarshal([]byte(docsRead(t, "test/clients/package.json")), &pkg); err != nil {
		t.Fatal(err)
	}
	need, ok := nodeMinimum(pkg.Engines.Node)
	if !ok {
		t.Fatalf("test/clients/package.json: engines.node %q is not >=N", pkg.Engines.Node)
	}
	major := strconv.Itoa(need[0])

	words := regexp.MustCompile(`Node\.js (\d+)\+?`)
	for _, doc := range []string{"README.md", "examples/ai-typewriter/README.md"} {
		found := words.FindAllStringSubmatch(docsRead(t, doc), -1)
		if len(found) == 0 {
			t.Errorf("%s names no Node.js version", doc)
		}
		for _, f := range found {
			if f[1] != major {
				t.Errorf("%s says %q; test/clients/package.json says Node.js %s", doc, f[0], pkg.Engines.Node)
			}
		}
	}
	clientsReadme := docsRead(t, "test/clients/README.md")
	if want := "Setup (Node.js " + major + " or later"; !strings.Contains(clientsReadme, want) {
		t.Errorf("test/clients/README.md does not say %q", want)
	}
	if !strings.Contains(docsRead(t, ".ci/run"), `require("./test/clients/package.json").engines.node`) {
		t.Error(".ci/run no longer checks Node.js against test/clients/package.json")
	}

	for _, lock := range []string{"test/clients/package-lock.json", "examples/ai-typewriter/package-lock.json"} {
		var l struct {
			Packages map[string]struct {
				Version string `json:"version"`
				Engines any    `json:"engines"`
			} `json:"packages"`
		}
		if err := json.Unmarshal([]byte(docsRead(t, lock)), &l); err != nil {
			t.Fatal(err)
		}
		for path, p := range l.Packages {
			eng, _ := p.Engines.(map[string]any)
			node, _ := eng["node"].(string)
			if node == "" || strings.Contains(node, "*") {
				// "*", or alternatives such as "6.* || 8.* || >= 10.*":
				// ranges of that shape here all accept every Node.js since 10.
				continue
			}
			min, ok := nodeMinimum(node)
			if !ok {
				t.Errorf("%s: %s declares engines.node %q, which this test cannot read", lock, path, node)
				continue
			}
			if compareVersions(min, need) <= 0 {
				continue
			}
			name := strings.TrimPrefix(path, "node_modules/")
			declared := fmt.Sprintf("%d.%d", min[0], min[1])
			if !strings.Contains(clientsReadme, "`"+name+"`") || !strings.Contains(clientsReadme, "Node.js "+declared) {
				t.Errorf("%s: %s %s declares Node.js %s, above the %s of test/clients/package.json, and test/clients/README.md does not say so (name it and Node.js %s)",
					lock, name, p.Version, node, pkg.Engines.Node, declared)
			}
		}
	}
}

// nodeMinimum reads an engines range of the form ">=X[.Y[.Z]]" (the only
// form the lock files hold) as [X, Y, Z].
func nodeMinimum(r string) ([3]int, bool) {
	var v [3]int
	r = strings.TrimSpace(r)
	if !strings.HasPrefix(r, ">=") {
		return v, false
	}
	parts := strings.Split(strings.TrimSpace(r[2:]), ".")
	if len(parts) > 3 {
		return v, false
	}
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil {
			return v, false
		}
		v[i] = n
	}
	return v, true
}

func compareVersions(a, b [3]int) int {
	for i := range a {
		if a[i] != b[i] {
			if a[i] < b[i] {
				return -1
			}
			return 1
		}
	}
	return 0
}

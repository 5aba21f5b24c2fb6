package sentinelcluster

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/examples/internal/exampletest"
	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

// TestMain removes the Caddy binary the tests built.
func TestMain(m *testing.M) {
	caddyproc.Main(m)
}

// Both shipped files adapt and validate as they are (validation provisions
// the handlers; nothing needs to listen on the addresses for that).
func TestCaddyfilesValidate(t *testing.T) {
	bin := caddyproc.Binary(t)
	for _, name := range []string{"sentinel.Caddyfile", "cluster.Caddyfile"} {
		for _, cmd := range []string{"adapt", "validate"} {
			c := exec.Command(bin, cmd, "--config", name)
			c.Env = append(os.Environ(), "HOME="+t.TempDir())
			out, err := c.CombinedOutput()
			if err != nil {
				t.Fatalf("caddy %s --config %s: %v\n%s", cmd, name, err, out)
			}
			if cmd == "adapt" && !strings.Contains(string(out), `"handler":"sse"`) {
				t.Fatalf("caddy adapt --config %s has no sse handler:\n%s", name, out)
			}
		}
	}
}

func testApp(t *testing.T) string {
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "app")
	}))
	t.Cleanup(app.Close)
	return app.Listener.Addr().String()
}

func port(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}

// startSentinel runs a Sentinel (redis-server --sentinel) on a free port of
// 127.0.0.1 that monitors master as mymaster, and returns its address.
func startSentinel(t *testing.T, master string) string {
	t.Helper()
	dir := t.TempDir()
	addr := fmt.Sprintf("127.0.0.1:%d", caddyproc.FreePort(t))
	conf := filepath.Join(dir, "sentinel.conf") // Sentinel rewrites it
	err := os.WriteFile(conf, []byte(fmt.Sprintf(`port %s
bind 127.0.0.1
dir %s
sentinel monitor mymaster 127.0.0.1 %s 1
sentinel down-after-milliseconds mymaster 1000
sentinel failover-timeout mymaster 10000
`, port(addr), dir, port(master))), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("redis-server", conf, "--sentinel")
	out := &strings.Builder{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	sc := redis.NewSentinelClient(&redis.Options{Addr: addr})
	defer sc.Close()
	waitFor(t, 10*time.Second, "the Sentinel to answer", func() bool {
		return sc.Ping(context.Background()).Err() == nil
	})
	return addr
}

// waitFor polls cond every 50ms until it holds, failing the test after d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for %s", d, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Streams through Sentinel, and across a failover: the master dies, the
// Sentinel promotes the replica, and the open stream keeps receiving.
func TestSentinelStreamsAndFailsOver(t *testing.T) {
	caddyproc.SkipShort(t)
	ctx := context.Background()
	master := redistest.Start(t)
	replica := redistest.Start(t, "--replicaof", "127.0.0.1", port(master.Addr()))
	waitFor(t, 10*time.Second, "the replica to sync", func() bool {
		info, _ := replica.Client().Info(ctx, "replication").Result()
		return strings.Contains(info, "master_link_status:up")
	})
	sentinel := startSentinel(t, master.Addr())
	sc := redis.NewSentinelClient(&redis.Options{Addr: sentinel})
	defer sc.Close()
	waitFor(t, 15*time.Second, "the Sentinel to know the replica", func() bool {
		r, _ := sc.Replicas(ctx, "mymaster").Result()
		return len(r) == 1
	})

	cf := exampletest.Caddyfile(t, "sentinel.Caddyfile",
		"http://localhost:8000", "http://127.0.0.1:{HTTP}",
		"addrs 127.0.0.1:26379 127.0.0.1:26380 127.0.0.1:26381", "addrs "+sentinel,
		"reverse_proxy 127.0.0.1:8080", "reverse_proxy "+testApp(t),
	)
	in := caddyproc.Start(t, cf, nil)
	redistest.WaitLibrary(t, master.Client(), "caddy_sse")

	s := ssetest.Open(t, in.URL()+"/events/42")
	if n := ssetest.Publish(t, master.Client(), "user:42", "via sentinel"); n != 1 {
		t.Fatalf("PUBLISH on the master reached %d subscriptions, want 1", n)
	}
	ssetest.Expect(t, s, "via sentinel")
	id := ssetest.PublishResumable(t, master.Client(), "user:42", "resumable via sentinel")
	if ev := ssetest.Next(t, s); ev.Data != "resumable via sentinel" || ev.ID != id {
		t.Fatalf("got %+v, want id %s", ev, id)
	}

	// The master dies; the Sentinel promotes the replica.
	master.Stop()
	waitFor(t, 30*time.Second, "the Sentinel to promote the replica", func() bool {
		addr, err := sc.GetMasterAddrByName(ctx, "mymaster").Result()
		return err == nil && len(addr) == 2 && addr[1] == port(replica.Addr())
	})
	waitFor(t, 10*time.Second, "the replica to become a master", func() bool {
		info, _ := replica.Client().Info(ctx, "replication").Result()
		return strings.Contains(info, "role:master")
	})
	// Published on the new master, resumable: it reaches the stream that
	// stayed open, through the new subscription (or the catch-up from
	// history if it was published while Caddy was still switching).
	after := ssetest.PublishResumable(t, replica.Client(), "user:42", "after the failover")
	ev, err := s.Next(20 * time.Second)
	if err != nil {
		t.Fatalf("after the failover, the open stream got nothing: %v (raw %q)\n%s", err, s.Raw(), in.Logs())
	}
	if ev.Data != "after the failover" || ev.ID != after {
		t.Fatalf("after the failover got %+v, want id %s", ev, after)
	}
	select {
	case <-s.Done():
		t.Fatal("the stream was closed by the failover")
	default:
	}
	// And fire-and-forget events flow on the new master.
	waitFor(t, 10*time.Second, "Caddy to subscribe on the new master", func() bool {
		n, _ := replica.Client().PubSubNumSub(ctx, "user:42").Result()
		return n["user:42"] == 1
	})
	ssetest.Publish(t, replica.Client(), "user:42", "live on the new master")
	ssetest.Expect(t, s, "live on the new master")
}

// Streams through Redis Cluster: a PUBLISH on any node reaches the stream.
func TestClusterStreams(t *testing.T) {
	caddyproc.SkipShort(t)
	exampletest.NeedBinary(t, "redis-cli", "apt-get install -y redis-tools")
	ctx := context.Background()
	var nodes []*redistest.Server
	var addrs []string
	for range 3 {
		n := redistest.Start(t, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
			"--cluster-node-timeout", "2000")
		nodes = append(nodes, n)
		addrs = append(addrs, n.Addr())
	}
	create := exec.Command("redis-cli", append(append([]string{"--cluster", "create"}, addrs...), "--cluster-yes")...)
	if out, err := create.CombinedOutput(); err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	for _, n := range nodes {
		waitFor(t, 20*time.Second, "the cluster to be ok on "+n.Addr(), func() bool {
			info, _ := n.Client().ClusterInfo(ctx).Result()
			return strings.Contains(info, "cluster_state:ok")
		})
	}

	cf := exampletest.Caddyfile(t, "cluster.Caddyfile",
		"http://localhost:8000", "http://127.0.0.1:{HTTP}",
		"addrs 127.0.0.1:7000 127.0.0.1:7001 127.0.0.1:7002", "addrs "+strings.Join(addrs, " "),
		"reverse_proxy 127.0.0.1:8080", "reverse_proxy "+testApp(t),
	)
	in := caddyproc.Start(t, cf, nil)
	s := ssetest.Open(t, in.URL()+"/events/42")
	for i, n := range nodes {
		msg := fmt.Sprintf("published on node %d", i)
		ssetest.Publish(t, n.Client(), "user:42", msg)
		if ev := ssetest.Next(t, s); ev.Data != msg {
			t.Fatalf("got %+v, want %q", ev, msg)
		}
	}
	other := ssetest.Open(t, in.URL()+"/events/7")
	ssetest.Publish(t, nodes[2].Client(), "user:7", "for 7")
	ssetest.Expect(t, other, "for 7")
	ssetest.NoEvent(t, s, 100*time.Millisecond)

	// Resumable events, published as the Caddyfile's comment says, with a
	// cluster client.
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs})
	defer cc.Close()
	waitFor(t, 15*time.Second, "Caddy to load the history functions in the cluster", func() bool {
		return cc.FCall(ctx, "sse_publish", []string{"{sse}:h:user:0"}, "warm-up").Err() == nil
	})
	fcall := func(channel, payload string) string {
		t.Helper()
		id, err := cc.FCall(ctx, "sse_publish", []string{"{sse}:h:" + channel}, payload).Result()
		if err != nil {
			t.Fatalf("FCALL sse_publish 1 {sse}:h:%s: %v", channel, err)
		}
		return fmt.Sprint(id)
	}
	first := fcall("user:42", "resumable 1")
	if ev := ssetest.Next(t, s); ev.Data != "resumable 1" || ev.ID != first {
		t.Fatalf("got %+v, want id %s", ev, first)
	}
	s.Close()
	second := fcall("user:42", "resumable 2")
	resumed := ssetest.Open(t, in.URL()+"/events/42", "Last-Event-ID", first)
	if ev := ssetest.Next(t, resumed); ev.Data != "resumable 2" || ev.ID != second {
		t.Fatalf("resumed: got %+v, want id %s", ev, second)
	}
}

// runScript runs one of this folder's scripts (sentinel.sh, cluster.sh) as
// the README does, with env naming its directory and ports, and fails the
// test if it does not succeed within 90s.
func runScript(t *testing.T, env []string, script, arg string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "sh", script, arg)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", script, arg, err, out)
	}
	return string(out)
}

// readmeSays fails the test unless the README has each of lines, each
// starting a line of its own: the test runs what the README says.
func readmeSays(t *testing.T, lines ...string) {
	t.Helper()
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range lines {
		if !strings.Contains(string(b), "\n"+l) {
			t.Fatalf("the README no longer says %q: update the test with it", l)
		}
	}
}

// closedPorts fails the test if anything still listens on one of ports.
func closedPorts(t *testing.T, what string, ports ...int) {
	t.Helper()
	for _, p := range ports {
		if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", p), time.Second); err == nil {
			c.Close()
			t.Errorf("after %s, port %d still accepts connections", what, p)
		}
	}
}

// The README's commands for Sentinel: sentinel.sh start brings up a
// master, a replica and three Sentinels; sentinel.Caddyfile streams from
// them; the manual failover the README gives promotes the replica and the
// open stream receives what is published on it; sentinel.sh stop stops
// every server.
func TestSentinelScript(t *testing.T) {
	caddyproc.SkipShort(t)
	exampletest.NeedBinary(t, "redis-cli", "apt-get install -y redis-tools")
	readmeSays(t,
		"examples/sentinel-cluster/sentinel.sh start",
		"./caddy run --config examples/sentinel-cluster/sentinel.Caddyfile &",
		"redis-cli -p 6380 FCALL sse_publish 1 user:42 ",
		"redis-cli -p 26379 SENTINEL FAILOVER mymaster",
		"redis-cli -p 6381 FCALL sse_publish 1 user:42 ",
		"examples/sentinel-cluster/sentinel.sh stop",
	)
	ctx := context.Background()
	master, replica := caddyproc.FreePort(t), caddyproc.FreePort(t)
	sentinels := []int{caddyproc.FreePort(t), caddyproc.FreePort(t), caddyproc.FreePort(t)}
	var sentinelAddrs, sentinelPorts []string
	for _, p := range sentinels {
		sentinelAddrs = append(sentinelAddrs, fmt.Sprintf("127.0.0.1:%d", p))
		sentinelPorts = append(sentinelPorts, fmt.Sprint(p))
	}
	env := []string{
		"DIR=" + t.TempDir(),
		fmt.Sprintf("MASTER_PORT=%d", master),
		fmt.Sprintf("REPLICA_PORT=%d", replica),
		"SENTINEL_PORTS=" + strings.Join(sentinelPorts, " "),
	}
	t.Cleanup(func() {
		runScript(t, env, "sentinel.sh", "stop")
		closedPorts(t, "sentinel.sh stop", append([]int{master, replica}, sentinels...)...)
	})
	runScript(t, env, "sentinel.sh", "start")

	cf := exampletest.Caddyfile(t, "sentinel.Caddyfile",
		"http://localhost:8000", "http://127.0.0.1:{HTTP}",
		"addrs 127.0.0.1:26379 127.0.0.1:26380 127.0.0.1:26381", "addrs "+strings.Join(sentinelAddrs, " "),
		"reverse_proxy 127.0.0.1:8080", "reverse_proxy "+testApp(t),
	)
	in := caddyproc.Start(t, cf, nil)
	client := func(port int) *redis.Client {
		c := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", port)})
		t.Cleanup(func() { c.Close() })
		return c
	}
	mc, rc := client(master), client(replica)
	redistest.WaitLibrary(t, mc, "caddy_sse")

	s := ssetest.Open(t, in.URL()+"/events/42")
	before := ssetest.PublishResumable(t, mc, "user:42", "before the failover")
	if ev := ssetest.Next(t, s); ev.Data != "before the failover" || ev.ID != before {
		t.Fatalf("got %+v, want id %s", ev, before)
	}

	sc := redis.NewSentinelClient(&redis.Options{Addr: sentinelAddrs[0]})
	defer sc.Close()
	if err := sc.Failover(ctx, "mymaster").Err(); err != nil {
		t.Fatalf("SENTINEL FAILOVER mymaster: %v", err)
	}
	waitFor(t, 30*time.Second, "the Sentinels to name the replica as the master", func() bool {
		addr, err := sc.GetMasterAddrByName(ctx, "mymaster").Result()
		return err == nil && len(addr) == 2 && addr[1] == fmt.Sprint(replica)
	})
	var id string
	waitFor(t, 10*time.Second, "FCALL sse_publish to succeed on the new master", func() bool {
		v, err := rc.FCall(ctx, "sse_publish", []string{"user:42"}, "after the failover").Result()
		id = fmt.Sprint(v)
		return err == nil
	})
	ev, err := s.Next(20 * time.Second)
	if err != nil {
		t.Fatalf("after the failover, the open stream got nothing: %v (raw %q)\n%s", err, s.Raw(), in.Logs())
	}
	if ev.Data != "after the failover" || ev.ID != id {
		t.Fatalf("after the failover got %+v, want id %s", ev, id)
	}
}

// The README's commands for Cluster: cluster.sh start brings up a
// three-node cluster; cluster.Caddyfile streams from it; a PUBLISH on any
// node and the resumable publish the README gives reach the stream;
// cluster.sh stop stops every node.
func TestClusterScript(t *testing.T) {
	caddyproc.SkipShort(t)
	exampletest.NeedBinary(t, "redis-cli", "apt-get install -y redis-tools")
	readmeSays(t,
		"examples/sentinel-cluster/cluster.sh start",
		"./caddy run --config examples/sentinel-cluster/cluster.Caddyfile &",
		"redis-cli -p 7001 PUBLISH user:42 ",
		"redis-cli -c -p 7000 FCALL sse_publish 1 '{sse}:h:user:42' ",
		"examples/sentinel-cluster/cluster.sh stop",
	)
	ctx := context.Background()
	var ports, items, addrs []string
	var all []int
	for range 3 {
		p, bus := caddyproc.FreePort(t), caddyproc.FreePort(t)
		all = append(all, p, bus)
		ports = append(ports, fmt.Sprint(p))
		items = append(items, fmt.Sprintf("%d:%d", p, bus))
		addrs = append(addrs, fmt.Sprintf("127.0.0.1:%d", p))
	}
	env := []string{"DIR=" + t.TempDir(), "CLUSTER_PORTS=" + strings.Join(items, " ")}
	t.Cleanup(func() {
		runScript(t, env, "cluster.sh", "stop")
		closedPorts(t, "cluster.sh stop", all...)
	})
	runScript(t, env, "cluster.sh", "start")

	cf := exampletest.Caddyfile(t, "cluster.Caddyfile",
		"http://localhost:8000", "http://127.0.0.1:{HTTP}",
		"addrs 127.0.0.1:7000 127.0.0.1:7001 127.0.0.1:7002", "addrs "+strings.Join(addrs, " "),
		"reverse_proxy 127.0.0.1:8080", "reverse_proxy "+testApp(t),
	)
	in := caddyproc.Start(t, cf, nil)
	s := ssetest.Open(t, in.URL()+"/events/42")
	for i, addr := range addrs {
		c := redis.NewClient(&redis.Options{Addr: addr})
		msg := "published on node " + ports[i]
		ssetest.Publish(t, c, "user:42", msg)
		c.Close()
		if ev := ssetest.Next(t, s); ev.Data != msg {
			t.Fatalf("got %+v, want %q", ev, msg)
		}
	}
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs})
	defer cc.Close()
	var id string
	waitFor(t, 15*time.Second, "Caddy to load the history functions in the cluster", func() bool {
		v, err := cc.FCall(ctx, "sse_publish", []string{"{sse}:h:user:42"}, `{"text":"hello"}`).Result()
		id = fmt.Sprint(v)
		return err == nil
	})
	if ev := ssetest.Next(t, s); ev.Data != `{"text":"hello"}` || ev.ID != id {
		t.Fatalf("got %+v, want id %s", ev, id)
	}
}

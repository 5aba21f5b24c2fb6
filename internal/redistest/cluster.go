package redistest

import (
	"cmp"
	"context"
	"fmt"
	"net"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Cluster is a Redis Cluster of processes on 127.0.0.1.
type Cluster struct {
	tb    testing.TB
	Nodes []*Server
}

// StartCluster starts masters*(1+replicas) cluster-enabled servers, joins
// them with `redis-cli --cluster create` and waits until every node reports
// the cluster ok with every slot covered. Nodes declare a peer failed after
// a second of silence, so a replica takes over a killed master quickly.
func StartCluster(tb testing.TB, masters, replicas int) *Cluster {
	tb.Helper()
	if testing.Short() {
		tb.Skip("redistest: starts a Redis Cluster; skipped with -short")
	}
	if _, err := exec.LookPath("redis-cli"); err != nil {
		tb.Fatalf("redistest: redis-cli not found on PATH (%v): install redis-tools", err)
	}
	c := &Cluster{tb: tb}
	for range masters * (1 + replicas) {
		// The bus port defaults to port+10000, which may not exist above
		// 55535: give each node a free one of its own.
		bus, err := freePort()
		if err != nil {
			tb.Fatalf("redistest: find a free port: %v", err)
		}
		c.Nodes = append(c.Nodes, Start(tb,
			"--cluster-enabled", "yes",
			"--cluster-config-file", "nodes.conf",
			"--cluster-port", strconv.Itoa(bus),
			"--cluster-node-timeout", "1000",
			// A lone replica may take over at once, whatever its lag.
			"--cluster-replica-validity-factor", "0",
		))
	}
	args := []string{"--cluster", "create"}
	for _, n := range c.Nodes {
		args = append(args, n.Addr())
	}
	args = append(args, "--cluster-replicas", strconv.Itoa(replicas), "--cluster-yes")
	if out, err := exec.Command("redis-cli", args...).CombinedOutput(); err != nil {
		tb.Fatalf("redistest: redis-cli %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	c.WaitOK()
	return c
}

// Addrs are the nodes' host:port addresses.
func (c *Cluster) Addrs() []string {
	addrs := make([]string, len(c.Nodes))
	for i, n := range c.Nodes {
		addrs[i] = n.Addr()
	}
	return addrs
}

// Client returns a cluster client, closed when the test ends.
func (c *Cluster) Client() *redis.ClusterClient {
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.Addrs()})
	c.tb.Cleanup(func() { _ = cc.Close() })
	return cc
}

// WaitOK waits until every running node reports cluster_state:ok and
// agrees on which running node serves every slot: after a master was
// stopped, until a replica took its slots over.
func (c *Cluster) WaitOK() {
	c.tb.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var why string
	for {
		if why = c.notOK(); why == "" {
			return
		}
		if time.Now().After(deadline) {
			c.tb.Fatalf("redistest: cluster not ok within 30s: %s", why)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (c *Cluster) notOK() string {
	ctx := context.Background()
	var want string
	for _, n := range c.Nodes {
		if !n.running() {
			continue
		}
		info, err := n.Client().ClusterInfo(ctx).Result()
		if err != nil {
			return err.Error()
		}
		if !strings.Contains(info, "cluster_state:ok") {
			return n.Addr() + " not ok"
		}
		m, err := c.slotMasters(n)
		if err != nil {
			return err.Error()
		}
		if want == "" {
			want = m
		} else if m != want {
			return "nodes disagree on the slots"
		}
	}
	return ""
}

// slotMasters describes which address serves which slots, as n sees it.
func (c *Cluster) slotMasters(n *Server) (string, error) {
	owners, err := slotOwners(n)
	if err != nil {
		return "", err
	}
	covered := int64(0)
	var b strings.Builder
	for _, o := range owners {
		covered += o.end - o.start + 1
		if !c.runningAddr(o.addr) {
			return "", fmt.Errorf("slots %d-%d served by %s, which is down", o.start, o.end, o.addr)
		}
		fmt.Fprintf(&b, "%d-%d:%s ", o.start, o.end, o.addr)
	}
	if covered != 16384 {
		return "", fmt.Errorf("%d of 16384 slots covered", covered)
	}
	return b.String(), nil
}

// slotOwner is a range of slots and the master serving it.
type slotOwner struct {
	start, end int64
	addr       string
}

// slotOwners is CLUSTER SHARDS as n sees it: the slot ranges and their
// masters, in slot order.
func slotOwners(n *Server) ([]slotOwner, error) {
	shards, err := n.Client().ClusterShards(context.Background()).Result()
	if err != nil {
		return nil, err
	}
	var out []slotOwner
	for _, sh := range shards {
		addr := ""
		for _, nd := range sh.Nodes {
			if nd.Role == "master" && nd.Health == "online" {
				addr = net.JoinHostPort(nd.IP, strconv.FormatInt(nd.Port, 10))
			}
		}
		for _, r := range sh.Slots {
			if addr == "" {
				return nil, fmt.Errorf("slots %d-%d have no master online", r.Start, r.End)
			}
			out = append(out, slotOwner{r.Start, r.End, addr})
		}
	}
	slices.SortFunc(out, func(a, b slotOwner) int { return cmp.Compare(a.start, b.start) })
	return out, nil
}

func (c *Cluster) runningAddr(addr string) bool {
	for _, n := range c.Nodes {
		if n.Addr() == addr {
			return n.running()
		}
	}
	return false
}

// MasterOf is the node serving the slot of key.
func (c *Cluster) MasterOf(key string) *Server {
	c.tb.Helper()
	for _, n := range c.Nodes {
		if !n.running() {
			continue
		}
		addr, err := c.masterAddr(n, key)
		if err != nil {
			c.tb.Fatalf("redistest: master of %q: %v", key, err)
		}
		for _, m := range c.Nodes {
			if m.Addr() == addr {
				return m
			}
		}
		c.tb.Fatalf("redistest: master of %q is %s, none of ours", key, addr)
	}
	c.tb.Fatal("redistest: no node running")
	return nil
}

func (c *Cluster) masterAddr(n *Server, key string) (string, error) {
	slot, err := n.Client().ClusterKeySlot(context.Background(), key).Result()
	if err != nil {
		return "", err
	}
	owners, err := slotOwners(n)
	if err != nil {
		return "", err
	}
	for _, o := range owners {
		if o.start <= slot && slot <= o.end {
			return o.addr, nil
		}
	}
	return "", fmt.Errorf("slot %d not served", slot)
}

// Masters are the nodes that currently serve slots.
func (c *Cluster) Masters() []*Server {
	c.tb.Helper()
	var out []*Server
	for _, n := range c.Nodes {
		if n.running() && isMaster(n) {
			out = append(out, n)
		}
	}
	return out
}

// MoveSlot migrates the slot of key, with its keys, to the master to, the
// way resharding does (CLUSTER SETSLOT IMPORTING/MIGRATING, MIGRATE, then
// SETSLOT NODE on every master), and waits until every node agrees.
func (c *Cluster) MoveSlot(key string, to *Server) {
	c.tb.Helper()
	ctx := context.Background()
	from := c.MasterOf(key)
	if from == to {
		return
	}
	slot, err := to.Client().ClusterKeySlot(ctx, key).Result()
	if err != nil {
		c.tb.Fatal(err)
	}
	fromID, toID := NodeID(c.tb, from), NodeID(c.tb, to)
	do := func(n *Server, args ...any) {
		c.tb.Helper()
		if err := n.Client().Do(ctx, args...).Err(); err != nil {
			c.tb.Fatalf("redistest: %v on %s: %v", args, n.Addr(), err)
		}
	}
	do(to, "CLUSTER", "SETSLOT", slot, "IMPORTING", fromID)
	do(from, "CLUSTER", "SETSLOT", slot, "MIGRATING", toID)
	for {
		keys, err := from.Client().ClusterGetKeysInSlot(ctx, int(slot), 100).Result()
		if err != nil {
			c.tb.Fatal(err)
		}
		if len(keys) == 0 {
			break
		}
		args := []any{"MIGRATE", "127.0.0.1", to.Port(), "", 0, 5000, "KEYS"}
		for _, k := range keys {
			args = append(args, k)
		}
		do(from, args...)
	}
	for _, m := range c.Masters() {
		do(m, "CLUSTER", "SETSLOT", slot, "NODE", toID)
	}
	c.WaitOK()
}

// NodeID is the cluster node id of n (CLUSTER MYID).
func NodeID(tb testing.TB, n *Server) string {
	tb.Helper()
	id, err := n.Client().Do(context.Background(), "CLUSTER", "MYID").Text()
	if err != nil {
		tb.Fatal(err)
	}
	return id
}

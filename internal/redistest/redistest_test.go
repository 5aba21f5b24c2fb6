package redistest

import (
	"context"
	"strings"
	"testing"
	"time"
)

func TestStartStopRestart(t *testing.T) {
	ctx := context.Background()
	s := Start(t, "--maxmemory", "64mb")
	if !strings.HasPrefix(s.URL(), "redis://127.0.0.1:") {
		t.Fatalf("URL() = %q", s.URL())
	}
	c := s.Client()
	if err := c.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if got := c.ConfigGet(ctx, "maxmemory").Val()["maxmemory"]; got != "67108864" {
		t.Fatalf("extra args not applied: maxmemory = %q", got)
	}
	s.Stop()
	// go-redis would redial for seconds before giving up: a refused PING
	// needs no more than a moment.
	stopped, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	if err := c.Ping(stopped).Err(); err == nil {
		t.Fatal("PING answered after Stop")
	}
	s.Stop() // stopping twice is harmless
	s.Restart()
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatalf("PING after Restart: %v", err)
	}
	if n := c.Exists(ctx, "k").Val(); n != 0 {
		t.Fatal("data survived a restart without persistence")
	}
}

func TestTwoServers(t *testing.T) {
	a, b := Start(t), Start(t)
	if a.Addr() == b.Addr() {
		t.Fatalf("two servers on %s", a.Addr())
	}
}

func TestSentinelFailover(t *testing.T) {
	st := StartSentinel(t, 1, 3)
	old := st.Master()
	if old != st.Servers[0] {
		t.Fatalf("master %s, want %s", old.Addr(), st.Servers[0].Addr())
	}
	c := st.Client()
	if err := c.Set(context.Background(), "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	m := st.Failover()
	if m == old {
		t.Fatal("the master did not change")
	}
	if err := c.Set(context.Background(), "k", "w", 0).Err(); err != nil {
		t.Fatalf("write after failover: %v", err)
	}
}

func TestCluster(t *testing.T) {
	c := StartCluster(t, 3, 0)
	if n := len(c.Masters()); n != 3 {
		t.Fatalf("%d masters, want 3", n)
	}
	cc := c.Client()
	for _, k := range []string{"a", "b", "c", "d"} {
		if err := cc.Set(context.Background(), k, "v", 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if c.MasterOf("a") == c.MasterOf("b") && c.MasterOf("b") == c.MasterOf("c") {
		t.Log("keys on one master")
	}
}

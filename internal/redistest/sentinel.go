package redistest

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// MasterName is the name the Sentinels of StartSentinel monitor.
const MasterName = "mymaster"

// Sentinel is a replicated Redis watched by Sentinel processes: a master,
// its replicas and the Sentinels, all on 127.0.0.1.
type Sentinel struct {
	tb        testing.TB
	Servers   []*Server // the master first, then the replicas
	Sentinels []*Server
}

// StartSentinel starts a master, replicas replicating it and sentinels
// Sentinel processes monitoring it as MasterName with a quorum of two (or
// one for a single Sentinel), and waits until every Sentinel knows every
// replica and every other Sentinel, so that a failover can start at once.
// Sentinels declare a master down after a second of silence.
func StartSentinel(tb testing.TB, replicas, sentinels int) *Sentinel {
	tb.Helper()
	if testing.Short() {
		tb.Skip("redistest: starts Redis with Sentinels; skipped with -short")
	}
	st := &Sentinel{tb: tb}
	master := Start(tb)
	st.Servers = append(st.Servers, master)
	for range replicas {
		r := Start(tb, "--replicaof", "127.0.0.1", strconv.Itoa(master.Port()))
		st.Servers = append(st.Servers, r)
	}
	quorum := min(2, sentinels)
	for range sentinels {
		s := &Server{tb: tb, dir: tb.TempDir(), args: []string{"--sentinel"}}
		s.conf = filepath.Join(s.dir, "sentinel.conf")
		st.Sentinels = append(st.Sentinels, s.launch(func(int) error {
			// Sentinel rewrites its config file, so each has its own.
			conf := fmt.Sprintf(`sentinel resolve-hostnames no
sentinel monitor %[1]s 127.0.0.1 %[2]d %[3]d
sentinel down-after-milliseconds %[1]s 1000
sentinel failover-timeout %[1]s 5000
sentinel parallel-syncs %[1]s 1
`, MasterName, master.Port(), quorum)
			return os.WriteFile(s.conf, []byte(conf), 0o600)
		}))
	}
	st.waitReady(replicas, sentinels-1)
	return st
}

// SentinelAddrs are the Sentinels' host:port addresses.
func (st *Sentinel) SentinelAddrs() []string {
	addrs := make([]string, len(st.Sentinels))
	for i, s := range st.Sentinels {
		addrs[i] = s.Addr()
	}
	return addrs
}

// Client returns a Sentinel-aware client of the current master, closed when
// the test ends.
func (st *Sentinel) Client() *redis.Client {
	c := redis.NewFailoverClient(&redis.FailoverOptions{
		MasterName:    MasterName,
		SentinelAddrs: st.SentinelAddrs(),
	})
	st.tb.Cleanup(func() { _ = c.Close() })
	return c
}

// MasterAddr is the master's address as the first Sentinel that answers
// sees it.
func (st *Sentinel) MasterAddr() (string, error) {
	var err error
	for _, s := range st.Sentinels {
		var addr []string
		addr, err = sentinelClient(s).GetMasterAddrByName(context.Background(), MasterName).Result()
		if err == nil {
			return net.JoinHostPort(addr[0], addr[1]), nil
		}
	}
	return "", err
}

// Master is the server the Sentinels currently call master.
func (st *Sentinel) Master() *Server {
	st.tb.Helper()
	addr, err := st.MasterAddr()
	if err != nil {
		st.tb.Fatalf("redistest: sentinel master: %v", err)
	}
	for _, s := range st.Servers {
		if s.Addr() == addr {
			return s
		}
	}
	st.tb.Fatalf("redistest: sentinel names master %s, which is none of ours", addr)
	return nil
}

// Failover asks a Sentinel to fail the master over (SENTINEL FAILOVER) and
// waits until the Sentinels name a new master that accepts writes. It
// returns the new master.
func (st *Sentinel) Failover() *Server {
	st.tb.Helper()
	old := st.Master()
	// A Sentinel refuses with INPROG or NOGOODSLAVE while a replica is
	// still syncing: retry for a while.
	deadline := time.Now().Add(20 * time.Second)
	for {
		err := sentinelClient(st.Sentinels[0]).Failover(context.Background(), MasterName).Err()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			st.tb.Fatalf("redistest: SENTINEL FAILOVER: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	return st.WaitNewMaster(old)
}

// WaitNewMaster waits until every running Sentinel names a master other
// than old, and that master answers as one.
func (st *Sentinel) WaitNewMaster(old *Server) *Server {
	st.tb.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if m := st.agreedMaster(); m != nil && m != old && isMaster(m) {
			return m
		}
		if time.Now().After(deadline) {
			st.tb.Fatalf("redistest: no new master within 30s (old %s)", old.Addr())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// agreedMaster is the master every running Sentinel names, or nil.
func (st *Sentinel) agreedMaster() *Server {
	var agreed string
	for _, s := range st.Sentinels {
		if !s.running() {
			continue
		}
		addr, err := sentinelClient(s).GetMasterAddrByName(context.Background(), MasterName).Result()
		if err != nil {
			return nil
		}
		a := net.JoinHostPort(addr[0], addr[1])
		if agreed != "" && a != agreed {
			return nil
		}
		agreed = a
	}
	for _, s := range st.Servers {
		if s.Addr() == agreed {
			return s
		}
	}
	return nil
}

func (st *Sentinel) waitReady(replicas, peers int) {
	st.tb.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ready := true
		for _, s := range st.Sentinels {
			m, err := sentinelClient(s).Master(ctx, MasterName).Result()
			if err != nil || m["num-slaves"] != strconv.Itoa(replicas) || m["num-other-sentinels"] != strconv.Itoa(peers) {
				ready = false
				break
			}
			// Replicas that are still syncing cannot be promoted.
			rs, err := sentinelClient(s).Replicas(ctx, MasterName).Result()
			if err != nil {
				ready = false
				break
			}
			for _, r := range rs {
				if r["master-link-status"] != "ok" {
					ready = false
				}
			}
		}
		if ready {
			return
		}
		if time.Now().After(deadline) {
			st.tb.Fatalf("redistest: sentinels not ready within 30s")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// sentinelClient is a short-lived connection to one Sentinel.
func sentinelClient(s *Server) *redis.SentinelClient {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sentinel == nil {
		s.sentinel = redis.NewSentinelClient(&redis.Options{Addr: s.Addr(), MaxRetries: -1})
	}
	return s.sentinel
}

// IsMaster reports whether s answers ROLE as a master.
func (s *Server) IsMaster() bool { return isMaster(s) }

// isMaster reports whether s answers ROLE as a master.
func isMaster(s *Server) bool {
	role, err := s.Client().Do(context.Background(), "ROLE").Slice()
	return err == nil && len(role) > 0 && role[0] == "master"
}

// running reports whether the process is up (not stopped).
func (s *Server) running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cmd != nil && !s.stopped
}

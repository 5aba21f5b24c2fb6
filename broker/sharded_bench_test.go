package broker

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/caddy-sse/caddy-sse/internal/redistest"
)

// The benchmarks below measure what sharded mode costs Redis, as the CPU
// time the redis-server processes report (INFO cpu) over b.N operations,
// per operation ("redis-us/op"), on a cluster of three masters. They are
// the figures of docs/scaling.md:
//
//	go test -run '^$' -bench Sharded -benchtime 20000x ./broker

// clusterCPU is the CPU time each of the cluster's running nodes used so
// far, in microseconds.
func clusterCPU(b *testing.B, nodes []*redistest.Server) []float64 {
	b.Helper()
	var out []float64
	for _, n := range nodes {
		var sum float64
		if !n.IsRunning() {
			continue
		}
		info, err := n.Client().Info(context.Background(), "cpu").Result()
		if err != nil {
			b.Fatal(err)
		}
		for _, line := range strings.Split(info, "\n") {
			k, v, _ := strings.Cut(strings.TrimSpace(line), ":")
			if k == "used_cpu_user" || k == "used_cpu_sys" {
				x, _ := strconv.ParseFloat(v, 64)
				sum += x * 1e6
			}
		}
		out = append(out, sum)
	}
	return out
}

// cpuMark is the nodes' CPU time at a moment, with what they use while
// idle (cron, the cluster bus), measured just before.
type cpuMark struct {
	at   time.Time
	used []float64
	idle []float64 // microseconds per second
}

// markCPU measures the nodes' idle CPU for half a second, then marks the
// start of an operation.
func markCPU(b *testing.B, nodes []*redistest.Server) cpuMark {
	b.Helper()
	const idleFor = 500 * time.Millisecond
	before := clusterCPU(b, nodes)
	time.Sleep(idleFor)
	m := cpuMark{at: time.Now(), used: clusterCPU(b, nodes)}
	for i := range m.used {
		m.idle = append(m.idle, (m.used[i]-before[i])/idleFor.Seconds())
	}
	return m
}

// reportCPU reports the CPU the nodes used since the mark, less what they
// use while idle, per operation: all of them together, and the busiest.
func reportCPU(b *testing.B, nodes []*redistest.Server, m cpuMark) {
	b.Helper()
	after := clusterCPU(b, nodes)
	elapsed := time.Since(m.at).Seconds()
	var total, busiest float64
	for i := range after {
		d := max(after[i]-m.used[i]-m.idle[i]*elapsed, 0)
		total += d
		busiest = max(busiest, d)
	}
	b.ReportMetric(total/float64(b.N), "redis-us/op")
	b.ReportMetric(busiest/float64(b.N), "busiest-node-us/op")
}

// benchCluster starts three masters with a replica each and a broker
// (sharded or not) subscribed to channels ch:0..ch:n-1, with the function
// library loaded.
func benchCluster(b *testing.B, n int, sharded bool) (*redistest.Cluster, *Broker, []string) {
	b.Helper()
	c := redistest.StartCluster(b, 3, 1)
	br := startBroker(b, Options{
		Redis:   &redis.UniversalOptions{Addrs: c.Addrs()[:1]},
		Cluster: true,
		Sharded: sharded,
		Logger:  zap.NewNop(),
	}, newRecorder())
	ctx := context.Background()
	if err := br.EnsureHistory(ctx, Retention{MaxLen: 100}); err != nil {
		b.Fatal(err)
	}
	chans := make([]string, n)
	for i := range chans {
		chans[i] = "ch:" + strconv.Itoa(i)
	}
	if err := br.Subscribe(ctx, chans...); err != nil {
		b.Fatal(err)
	}
	return c, br, chans
}

// pipelined runs ops in pipelines of 100 through a cluster client.
func pipelined(b *testing.B, cc *redis.ClusterClient, n int, op func(p redis.Pipeliner, i int)) {
	b.Helper()
	ctx := context.Background()
	for i := 0; i < n; {
		_, err := cc.Pipelined(ctx, func(p redis.Pipeliner) error {
			for j := 0; j < 100 && i < n; j, i = j+1, i+1 {
				op(p, i)
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}
}

// A resumable publish (FCALL sse_publish: the id, XADD, EXPIRE and
// SPUBLISH of the twin) on one of 1,000 channels, delivered to one
// subscribed instance; and a plain SPUBLISH.
func BenchmarkShardedPublish(b *testing.B) {
	c, _, chans := benchCluster(b, 1000, true)
	cc := c.Client()
	payload := strings.Repeat("p", 100)
	for _, tc := range []struct {
		name string
		op   func(p redis.Pipeliner, i int)
	}{
		{"resumable", func(p redis.Pipeliner, i int) {
			ch := chans[i%len(chans)]
			p.FCall(context.Background(), PublishFunction, []string{ShardedHistoryKey(ch)}, payload)
		}},
		{"spublish", func(p redis.Pipeliner, i int) {
			p.SPublish(context.Background(), chans[i%len(chans)], payload)
		}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			cpu := markCPU(b, c.Nodes)
			b.ResetTimer()
			pipelined(b, cc, b.N, tc.op)
			b.StopTimer()
			reportCPU(b, c.Nodes, cpu)
		})
	}
}

// The same without sharding: every resumable publish goes through the
// {sse} slot's master and is broadcast over the cluster bus.
func BenchmarkClusterResumablePublish(b *testing.B) {
	c, _, chans := benchCluster(b, 1000, false)
	cc := c.Client()
	payload := strings.Repeat("p", 100)
	cpu := markCPU(b, c.Nodes)
	b.ResetTimer()
	pipelined(b, cc, b.N, func(p redis.Pipeliner, i int) {
		p.FCall(context.Background(), PublishFunction, []string{ClusterKeyPrefix + chans[i%len(chans)]}, payload)
	})
	b.StopTimer()
	reportCPU(b, c.Nodes, cpu)
}

// A plain PUBLISH on a cluster is sent to every node over the cluster bus:
// its cost grows with the nodes, whoever subscribes. Three masters with a
// replica each; the CPU of all six nodes counts.
func BenchmarkClusterBroadcastPublish(b *testing.B) {
	c := redistest.StartCluster(b, 3, 1)
	cc := c.Client()
	payload := strings.Repeat("p", 100)
	cpu := markCPU(b, c.Nodes)
	b.ResetTimer()
	pipelined(b, cc, b.N, func(p redis.Pipeliner, i int) {
		p.Publish(context.Background(), "ch:"+strconv.Itoa(i%1000), payload)
	})
	b.StopTimer()
	reportCPU(b, c.Nodes, cpu)
}

// Subscribing a channel the instance did not have: SSUBSCRIBE of the
// channel and its twin on its master's connection, and the read of where
// its history stands (what the registry does once per channel).
func BenchmarkShardedSubscribe(b *testing.B) {
	c, br, _ := benchCluster(b, 0, true)
	ctx := context.Background()
	cpu := markCPU(b, c.Nodes)
	b.ResetTimer()
	for i := 0; i < b.N; i += 100 {
		batch := make([]string, 0, 100)
		for j := i; j < i+100 && j < b.N; j++ {
			batch = append(batch, "sub:"+strconv.Itoa(j))
		}
		if err := br.Subscribe(ctx, batch...); err != nil {
			b.Fatal(err)
		}
		if _, err := br.Heads(ctx, batch); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	reportCPU(b, c.Nodes, cpu)
}

// A plain SPUBLISH on a channel that ten instances subscribe: against
// BenchmarkShardedPublish/spublish (one instance), what each further
// subscribed instance costs the channel's master.
func BenchmarkShardedPublishTenInstances(b *testing.B) {
	c, _, chans := benchCluster(b, 1000, true)
	for range 9 {
		br := startBroker(b, Options{
			Redis:   &redis.UniversalOptions{Addrs: c.Addrs()[:1]},
			Cluster: true,
			Sharded: true,
			Logger:  zap.NewNop(),
		}, newRecorder())
		if err := br.Subscribe(context.Background(), chans...); err != nil {
			b.Fatal(err)
		}
	}
	cc := c.Client()
	payload := strings.Repeat("p", 100)
	cpu := markCPU(b, c.Nodes)
	b.ResetTimer()
	pipelined(b, cc, b.N, func(p redis.Pipeliner, i int) {
		p.SPublish(context.Background(), chans[i%len(chans)], payload)
	})
	b.StopTimer()
	reportCPU(b, c.Nodes, cpu)
}

// The history read of a resume: one channel's ten events after a position
// (one XRANGE of ReplayChannels).
func BenchmarkShardedReplay(b *testing.B) {
	c, br, chans := benchCluster(b, 100, true)
	ctx := context.Background()
	payload := strings.Repeat("p", 100)
	var from []uint64
	for _, ch := range chans {
		first, err := br.Publish(ctx, ch, []byte(payload), Retention{MaxLen: 100})
		if err != nil {
			b.Fatal(err)
		}
		for range 10 {
			if _, err := br.Publish(ctx, ch, []byte(payload), Retention{MaxLen: 100}); err != nil {
				b.Fatal(err)
			}
		}
		from = append(from, first)
	}
	cpu := markCPU(b, c.Nodes)
	b.ResetTimer()
	for i := 0; i < b.N; i += len(chans) {
		n := min(len(chans), b.N-i)
		pg, err := br.ReplayChannels(ctx, chans[:n], from[:n], 16)
		if err != nil || len(pg.Messages) != 10*n {
			b.Fatalf("replayed %d messages (%v), want %d", len(pg.Messages), err, 10*n)
		}
	}
	b.StopTimer()
	reportCPU(b, c.Nodes, cpu)
}

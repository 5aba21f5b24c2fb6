package caddysse_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/broker"
	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/redistest"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
	"github.com/caddy-sse/caddy-sse/internal/ssetest"
)

var shardedCaddyfile = globalOptions + `
http://127.0.0.1:{HTTP} {
	sse /s/* {
		redis {
			addrs {NODES}
			cluster
			sharded
		}
		channel {path.1}
		history 100000 1h
		buffer 2048
	}
	sse /m {
		redis {
			addrs {NODES}
			cluster
			sharded
		}
		channel {query.c}
		history 100000 1h
		buffer 2048
	}
	sse_publish /publish/* {
		redis {
			addrs {NODES}
			cluster
			sharded
		}
		channel {path.1}
		history 100000 1h
	}
}
`

// startSharded runs a Caddy in sharded mode on c and waits until the
// function library is on every master.
func startSharded(t *testing.T, c *redistest.Cluster) *caddyproc.Instance {
	t.Helper()
	in := caddyproc.Start(t, shardedCaddyfile, caddyproc.Options{"{NODES}": strings.Join(c.Addrs(), " ")})
	for _, m := range c.Masters() {
		redistest.WaitLibrary(t, m.Client(), "caddy_sse")
	}
	return in
}

// spublish publishes a resumable event the way a backend does in sharded
// mode: one FCALL naming the channel's history key.
func spublish(t testing.TB, cc *redis.ClusterClient, channel, payload string) uint64 {
	t.Helper()
	id, err := cc.FCall(context.Background(), "sse_publish", []string{broker.ShardedHistoryKey(channel)}, payload).Uint64()
	if err != nil {
		t.Fatalf("FCALL sse_publish %s: %v", broker.ShardedHistoryKey(channel), err)
	}
	return id
}

// waitShardNumsub waits until every channel has n shard subscribers on
// its master (one per Caddy instance).
func waitShardNumsub(t *testing.T, c *redistest.Cluster, n int64, chans ...string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for _, ch := range chans {
		for {
			m, err := c.MasterOf(ch).Client().PubSubShardNumSub(context.Background(), ch).Result()
			if err == nil && m[ch] == n {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s has %d shard subscribers, want %d (%v)", ch, m[ch], n, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// A stream on channels of three shards gets their events with a vector
// id, and resumes from it on another instance: exactly what it missed on
// each shard, in publish order, then live events. A stream on one channel
// keeps plain ids, those the publisher got back.
// TestShardedCluster runs, on one cluster of three masters with a replica
// each and two Caddy instances in sharded mode, the tests that leave them
// as they found them.
func TestShardedCluster(t *testing.T) {
	caddyproc.SkipShort(t)
	c := redistest.StartCluster(t, 3, 1)
	a, b := startSharded(t, c), startSharded(t, c)
	t.Run("ResumeAcrossShards", func(t *testing.T) { testShardedResumeAcrossShards(t, c, a, b) })
	t.Run("Balance", func(t *testing.T) { testShardedBalance(t, c, a) })
}

func testShardedResumeAcrossShards(t *testing.T, c *redistest.Cluster, a, b *caddyproc.Instance) {
	cc := c.Client()
	ctx := context.Background()
	chans := channelsOnShards(t, c)
	if len(chans) != 3 {
		t.Fatalf("channels on %d shards, want 3", len(chans))
	}
	multiPath := "/m?c=" + strings.Join(chans, ",")
	single := ssetest.Open(t, a.URL()+"/s/"+chans[0])
	multi := ssetest.Open(t, a.URL()+multiPath)
	waitShardNumsub(t, c, 1, chans...)

	a1 := spublish(t, cc, chans[0], "a1")
	spublish(t, cc, chans[1], "b1")
	spublish(t, cc, chans[2], "c1")
	a2 := spublish(t, cc, chans[0], "a2")
	if err := cc.SPublish(ctx, chans[1], "plain").Err(); err != nil {
		t.Fatal(err)
	}
	resp, err := http.Post(b.URL()+"/publish/"+chans[2], "text/plain", strings.NewReader("http"))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"id":"`) {
		t.Fatalf("sse_publish: %s %s", resp.Status, body)
	}

	evs := ssetest.Expect(t, single, "a1", "a2")
	if evs[0].ID != strconv.FormatUint(a1, 10) || evs[1].ID != strconv.FormatUint(a2, 10) {
		t.Fatalf("single-channel ids %q %q, want the published ids %d %d", evs[0].ID, evs[1].ID, a1, a2)
	}
	// Events of different shards come on different connections: only
	// each channel's order is set.
	got := expectAll(t, multi, "a1", "b1", "c1", "a2", "plain", "http")
	for i, ev := range got {
		if ev.Data == "plain" {
			if i == 0 || ev.ID != got[i-1].ID {
				t.Fatalf("a plain SPUBLISH moved the stream's id to %q", ev.ID)
			}
			continue
		}
		if !strings.HasPrefix(ev.ID, "v1.") || len(ev.ID) > 2+15*3 {
			t.Fatalf("event %q: id %q, want a vector of at most %d bytes", ev.Data, ev.ID, 2+15*3)
		}
		if i > 0 && ev.ID == got[i-1].ID {
			t.Fatalf("event %q did not move the id %q", ev.Data, ev.ID)
		}
	}
	if n := strings.Count(got[len(got)-1].ID, "."); n != 3 {
		t.Fatalf("id %q after events on each channel, want three positions", got[len(got)-1].ID)
	}
	last := multi.LastEventID()
	multi.Close()

	spublish(t, cc, chans[2], "c2")
	spublish(t, cc, chans[0], "a3")
	spublish(t, cc, chans[1], "b2")
	r := ssetest.Open(t, b.URL()+multiPath, "Last-Event-ID", last)
	ssetest.Expect(t, r, "c2", "a3", "b2")
	spublish(t, cc, chans[1], "b3")
	ssetest.Expect(t, r, "b3")
	ssetest.NoEvent(t, r, 300*time.Millisecond)

	// A single-channel stream resumes from its plain id on the other
	// instance; "0" replays everything retained on every channel.
	s2 := ssetest.Open(t, b.URL()+"/s/"+chans[0], "Last-Event-ID", evs[0].ID)
	ssetest.Expect(t, s2, "a2", "a3")
	all := ssetest.Open(t, b.URL()+multiPath+"&lastEventId=0")
	ssetest.Expect(t, all, "a1", "b1", "c1", "a2", "http", "c2", "a3", "b2", "b3")
	ssetest.NoEvent(t, all, 300*time.Millisecond)
}

// parallel runs f(0) to f(n-1) at once and fails the test with the first
// error.
func parallel(t *testing.T, n int, f func(i int) error) {
	t.Helper()
	errs := make(chan error, n)
	for i := range n {
		go func() { errs <- f(i) }()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

// expectAll reads len(want) events and checks that they are want, each
// channel's (the data's first letter) in order, whatever the order between
// channels.
func expectAll(t testing.TB, s *sseclient.Stream, want ...string) []sseclient.Event {
	t.Helper()
	var got []sseclient.Event
	next := map[byte]int{}
	for range want {
		ev, err := s.Next(5 * time.Second)
		if err != nil {
			t.Fatalf("after %d of %q: %v (raw so far %q)", len(got), want, err, s.Raw())
		}
		got = append(got, ev)
	}
	for _, ev := range got {
		k := byte(0)
		if ev.Data != "" {
			k = ev.Data[0]
		}
		i := next[k]
		for i < len(want) && (want[i] == "" || want[i][0] != k) {
			i++
		}
		if i == len(want) || want[i] != ev.Data {
			t.Fatalf("got %q out of order or unexpected; want %q (each channel in order)", ev.Data, want)
		}
		next[k] = i + 1
	}
	return got
}

// commandStats reads INFO commandstats of n: calls and microseconds per
// command.
func commandStats(t testing.TB, n *redistest.Server) (calls, usec map[string]int64) {
	t.Helper()
	info, err := n.Client().Info(context.Background(), "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	calls, usec = map[string]int64{}, map[string]int64{}
	for _, line := range strings.Split(info, "\n") {
		name, rest, ok := strings.Cut(strings.TrimSpace(line), ":")
		cmd, found := strings.CutPrefix(name, "cmdstat_")
		if !ok || !found {
			continue
		}
		for _, kv := range strings.Split(rest, ",") {
			k, v, _ := strings.Cut(kv, "=")
			x, _ := strconv.ParseInt(v, 10, 64)
			switch k {
			case "calls":
				calls[cmd] = x
			case "usec":
				usec[cmd] = x
			}
		}
	}
	return calls, usec
}

func resetStats(t testing.TB, c *redistest.Cluster) {
	t.Helper()
	for _, m := range c.Masters() {
		if err := m.Client().ConfigResetStat(context.Background()).Err(); err != nil {
			t.Fatal(err)
		}
	}
}

// loadCommands are the commands of publishing and of history: FCALL
// sse_publish and what it runs, SPUBLISH, and the reads of replay and of
// subscribing.
var loadCommands = []string{"fcall", "time", "xrevrange", "xadd", "expire", "spublish", "xrange"}

// With 1,000 channels published uniformly, each of three masters serves
// about a third of the publish and history load (INFO commandstats), where
// one master takes all of it without sharding. Subscribing costs two
// commands per channel per instance (SSUBSCRIBE with the twin, and the
// read of where its history stands), whatever the number of streams.
func testShardedBalance(t *testing.T, c *redistest.Cluster, in *caddyproc.Instance) {
	cc := c.Client()
	ctx := context.Background()
	const nchan, perStream, rounds = 1000, 10, 3
	chans := make([]string, nchan)
	for i := range chans {
		chans[i] = "ch:" + strconv.Itoa(i)
	}
	path := func(k int) string { return "/m?c=" + strings.Join(chans[k*perStream:(k+1)*perStream], ",") }

	resetStats(t, c)
	streams := make([]*sseclient.Stream, nchan/perStream)
	parallel(t, len(streams), func(k int) error {
		s, err := sseclient.Get(context.Background(), in.URL()+path(k))
		streams[k] = s
		return err
	})
	for _, s := range streams {
		t.Cleanup(s.Close)
	}
	subCmds := map[string]int64{}
	for _, m := range c.Masters() {
		calls, _ := commandStats(t, m)
		for _, cmd := range []string{"ssubscribe", "xrevrange"} {
			subCmds[cmd] += calls[cmd]
		}
	}
	t.Logf("subscribing %d channels: %d SSUBSCRIBE, %d XREVRANGE (%.2f commands per channel)",
		nchan, subCmds["ssubscribe"], subCmds["xrevrange"], float64(subCmds["ssubscribe"]+subCmds["xrevrange"])/nchan)
	if subCmds["xrevrange"] != nchan || subCmds["ssubscribe"] > nchan || subCmds["ssubscribe"] < nchan*9/10 {
		t.Fatalf("subscribing %d channels took %v, want one XREVRANGE and at most one SSUBSCRIBE each", nchan, subCmds)
	}
	// More streams on the same channels cost Redis nothing.
	for k := range 10 {
		ssetest.Open(t, in.URL()+path(k))
	}
	more := int64(0)
	for _, m := range c.Masters() {
		calls, _ := commandStats(t, m)
		more += calls["ssubscribe"] + calls["xrevrange"]
	}
	if more != subCmds["ssubscribe"]+subCmds["xrevrange"] {
		t.Fatalf("ten more streams on subscribed channels cost %d more commands", more-subCmds["ssubscribe"]-subCmds["xrevrange"])
	}

	resetStats(t, c)
	for round := range rounds {
		_, err := cc.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, ch := range chans {
				p.FCall(ctx, "sse_publish", []string{broker.ShardedHistoryKey(ch)}, ch+"/p"+strconv.Itoa(round))
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	received := make([][]sseclient.Event, len(streams))
	for k, s := range streams {
		for range perStream * rounds {
			ev, err := s.Next(10 * time.Second)
			if err != nil {
				t.Fatalf("stream %d after %d events: %v", k, len(received[k]), err)
			}
			received[k] = append(received[k], ev)
		}
		final := received[k][len(received[k])-1].ID
		if strings.Count(final, ".") != perStream || len(final) > 2+15*perStream {
			t.Fatalf("stream %d ends with id %q, want %d positions in at most %d bytes", k, final, perStream, 2+15*perStream)
		}
	}
	pubLoad := loadOf(t, c)
	var pubTotal int64
	for _, l := range pubLoad {
		pubTotal += l.calls
	}
	t.Logf("%.2f commands per resumable publish (FCALL and what it runs)", float64(pubTotal)/float64(nchan*rounds))

	// Every stream resumes from its tenth event: the history of its ten
	// channels, on three shards, gives back exactly the other twenty.
	parallel(t, len(streams), func(k int) error {
		streams[k].Close()
		r, err := sseclient.Get(context.Background(), in.URL()+path(k), "Last-Event-ID", received[k][9].ID)
		if err != nil {
			return err
		}
		defer r.Close()
		want := map[string]bool{}
		for _, ev := range received[k][10:] {
			want[ev.Data] = true
		}
		for range len(received[k]) - 10 {
			ev, err := r.Next(10 * time.Second)
			if err != nil {
				return fmt.Errorf("stream %d resumed: %w", k, err)
			}
			if !want[ev.Data] {
				return fmt.Errorf("stream %d resumed from its tenth event replays %q, not one of the twenty after it", k, ev.Data)
			}
			delete(want, ev.Data)
		}
		return nil
	})
	histLoad := loadOf(t, c)
	var total int64
	var lines []string
	for i, l := range pubLoad {
		l.calls += histLoad[i].calls
		l.usec += histLoad[i].usec
		l.xrange += histLoad[i].xrange
		pubLoad[i] = l
		total += l.calls
		lines = append(lines, fmt.Sprintf("%s: %d commands (%d FCALL, %d XRANGE), %d us", l.addr, l.calls, l.fcall, l.xrange, l.usec))
	}
	t.Logf("publish and history load per master:\n%s", strings.Join(lines, "\n"))
	if len(pubLoad) != 3 {
		t.Fatalf("%d masters, want 3", len(pubLoad))
	}
	for i, l := range pubLoad {
		if share := float64(l.calls) / float64(total); share < 0.8/3 || share > 1.2/3 {
			t.Fatalf("master %d serves %.1f%% of the load, want a third +-20%%: %s", i, 100*share, strings.Join(lines, "; "))
		}
	}
}

type masterLoad struct {
	addr                       string
	calls, usec, fcall, xrange int64
}

// loadOf reads the publish and history load of each master since the last
// resetStats, and resets the counters.
func loadOf(t testing.TB, c *redistest.Cluster) []masterLoad {
	t.Helper()
	var out []masterLoad
	for _, m := range c.Masters() {
		calls, usec := commandStats(t, m)
		l := masterLoad{addr: m.Addr(), fcall: calls["fcall"], xrange: calls["xrange"]}
		for _, cmd := range loadCommands {
			l.calls += calls[cmd]
			l.usec += usec[cmd]
		}
		out = append(out, l)
	}
	resetStats(t, c)
	return out
}

// chaosFollower is one client of TestShardedReshardAndFailoverUnderLoad: it
// reads its stream, drops it every few dozen events and resumes with its
// Last-Event-ID on the other instance, until every channel sent END.
type chaosFollower struct {
	path    string
	chans   []string
	got     map[string][]string // payloads received, per channel
	missed  int                 // sse-missed events received
	resumes int
	err     error
}

func (f *chaosFollower) run(ctx context.Context, insts []*caddyproc.Instance, idx int, ready chan<- struct{}) {
	f.got = map[string][]string{}
	ended := map[string]bool{}
	lastID := ""
	for round := 0; ; round++ {
		in := insts[(idx+round)%len(insts)]
		var header []string
		if lastID != "" {
			header = []string{"Last-Event-ID", lastID}
			f.resumes++
		}
		s, err := sseclient.Get(ctx, in.URL()+f.path, header...)
		if round == 0 {
			ready <- struct{}{}
		}
		if err != nil {
			if ctx.Err() != nil {
				f.err = fmt.Errorf("%s: %w", f.path, err)
				return
			}
			time.Sleep(50 * time.Millisecond)
			continue
		}
		quota := 10 + (idx*7+round*13)%25
		for k := 0; k < quota; k++ {
			ev, err := s.Next(20 * time.Second)
			if err != nil {
				s.Close()
				f.err = fmt.Errorf("%s round %d: %w (received %d)", f.path, round, err, len(f.got))
				return
			}
			if ev.Event == "sse-missed" {
				f.missed++
				continue
			}
			ch, _, _ := strings.Cut(ev.Data, "#")
			f.got[ch] = append(f.got[ch], ev.Data)
			lastID = ev.ID
			if strings.HasSuffix(ev.Data, "#END") {
				ended[ch] = true
				if len(ended) == len(f.chans) {
					s.Close()
					return
				}
			}
		}
		s.Close()
	}
}

// lowestSlot is the lowest slot master serves.
func lowestSlot(t *testing.T, cc *redis.ClusterClient, master *redistest.Server) int {
	t.Helper()
	shards, err := cc.ClusterShards(context.Background()).Result()
	if err != nil {
		t.Fatal(err)
	}
	lo := -1
	for _, sh := range shards {
		for _, n := range sh.Nodes {
			if n.Role == "master" && int(n.Port) == master.Port() {
				for _, r := range sh.Slots {
					if lo < 0 || int(r.Start) < lo {
						lo = int(r.Start)
					}
				}
			}
		}
	}
	if lo < 0 {
		t.Fatalf("%s serves no slot", master.Addr())
	}
	return lo
}

// Under 400 resumable events/s on 100 channels, read by 200 streams (160
// on one channel, 40 on three channels) on two Caddy instances that keep
// dropping and resuming on the other instance, 64 slots holding 20 of the
// channels are resharded to another master
// (redis-cli --cluster reshard) and then a master is killed and its replica
// takes over. Every stream gets every event its channels' history holds,
// once, in order, and no sse-missed.
func TestShardedReshardAndFailoverUnderLoad(t *testing.T) {
	caddyproc.SkipShort(t)
	c := redistest.StartCluster(t, 3, 1)
	insts := []*caddyproc.Instance{startSharded(t, c), startSharded(t, c)}
	t.Cleanup(func() {
		for i, in := range insts {
			for _, l := range strings.Split(in.Logs(), "\n") {
				if strings.Contains(l, `"sse`) && !strings.Contains(l, `"level":"debug"`) &&
					(t.Failed() || strings.Contains(l, "caught up") || strings.Contains(l, `"level":"warn"`)) {
					t.Logf("caddy %d: %s", i, l)
				}
			}
		}
	})
	cc := c.Client()
	masters := c.Masters()
	from, to := masters[0], masters[1]
	lo := lowestSlot(t, cc, from)
	var chans []string
	moving := 0
	const nchan, nmoving = 100, 20
	for i := 0; len(chans) < nchan; i++ {
		ch := "room:" + strconv.Itoa(i)
		in := broker.Slot(ch) >= lo && broker.Slot(ch) < lo+64
		if in && moving < nmoving {
			chans = append(chans, ch)
			moving++
		} else if !in && len(chans)-moving < nchan-nmoving {
			chans = append(chans, ch)
		}
	}
	var followers []*chaosFollower
	for i := range 160 {
		followers = append(followers, &chaosFollower{path: "/s/" + chans[i%nchan], chans: []string{chans[i%nchan]}})
	}
	for j := range 40 {
		three := []string{chans[j], chans[(j+33)%nchan], chans[(j+67)%nchan]}
		followers = append(followers, &chaosFollower{path: "/m?c=" + strings.Join(three, ","), chans: three})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	ready := make(chan struct{}, len(followers))
	done := make(chan struct{}, len(followers))
	for i, f := range followers {
		go func() {
			f.run(ctx, insts, i, ready)
			done <- struct{}{}
		}()
	}
	for range followers {
		<-ready
	}

	// The publisher: 400 events/s, round robin over the channels, sent
	// every 10 ms in a pipeline (what is due by then); a publish that
	// fails (in the failover) is not retried: the history is the truth.
	stop := make(chan struct{})
	var pubs sync.WaitGroup
	var sent, failed atomic.Int64
	pubs.Add(1)
	go func() {
		defer pubs.Done()
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		begin := time.Now()
		i := 0
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			select {
			case <-stop: // a late tick does not publish after the stop
				return
			default:
			}
			due := int(time.Since(begin).Seconds() * 400)
			pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
			cmds, _ := cc.Pipelined(pctx, func(p redis.Pipeliner) error {
				for ; i < due; i++ {
					ch := chans[i%len(chans)]
					p.FCall(pctx, "sse_publish", []string{broker.ShardedHistoryKey(ch)}, ch+"#"+strconv.Itoa(i))
				}
				return nil
			})
			pcancel()
			for _, cmd := range cmds {
				if cmd.Err() != nil {
					failed.Add(1)
				} else {
					sent.Add(1)
				}
			}
			if len(cmds) > 0 && cmds[len(cmds)-1].Err() != nil {
				cc.ReloadState(ctx)
			}
		}
	}()
	start := time.Now()

	time.Sleep(2 * time.Second)
	out, err := exec.Command("redis-cli", "--cluster", "reshard", from.Addr(),
		"--cluster-from", redistest.NodeID(t, from), "--cluster-to", redistest.NodeID(t, to),
		"--cluster-slots", "64", "--cluster-yes").CombinedOutput()
	if err != nil {
		t.Fatalf("redis-cli --cluster reshard: %v\n%s", err, out)
	}
	c.WaitOK()
	t.Logf("%s: resharded 64 slots", time.Since(start).Round(time.Millisecond))
	owner := slotOwners(t, cc)
	for _, ch := range chans {
		if s := broker.Slot(ch); s >= lo && s < lo+64 && owner(s) != to.Addr() {
			t.Fatalf("%s (slot %d) was not resharded to %s", ch, s, to.Addr())
		}
	}
	time.Sleep(2 * time.Second)
	from.Stop()
	t.Logf("%s: killed %s", time.Since(start).Round(time.Millisecond), from.Addr())
	c.WaitOK()
	t.Logf("%s: a replica took over", time.Since(start).Round(time.Millisecond))
	// The instances follow the slots: each channel has shard subscribers
	// on the master that serves it now.
	waitShardSubscribed(t, c, cc, chans)
	t.Logf("%s: every channel subscribed on its master", time.Since(start).Round(time.Millisecond))
	time.Sleep(time.Second)
	close(stop)
	publishing := time.Since(start)
	pubs.Wait()
	n := int(sent.Load())
	t.Logf("publishing for %s: %d publishes acknowledged, %d failed or timed out (the history is the truth)",
		publishing.Round(time.Millisecond), n, failed.Load())
	for _, ch := range chans {
		for {
			err := cc.FCall(ctx, "sse_publish", []string{broker.ShardedHistoryKey(ch)}, ch+"#END").Err()
			if err == nil {
				break
			}
			if ctx.Err() != nil {
				t.Fatal(err)
			}
			cc.ReloadState(ctx)
			time.Sleep(50 * time.Millisecond)
		}
	}
	for range followers {
		<-done
	}
	t.Logf("%s: every stream got every END", time.Since(start).Round(time.Millisecond))

	history := map[string][]string{}
	total := 0
	for _, ch := range chans {
		entries, err := cc.XRange(ctx, broker.ShardedHistoryKey(ch), "-", "+").Result()
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			history[ch] = append(history[ch], e.Values["d"].(string))
		}
		total += len(entries) - 1
	}
	if total < n*95/100 {
		t.Fatalf("history holds %d events, %d were published", total, n)
	}
	extras, resumes, delivered := 0, 0, 0
	for _, f := range followers {
		if f.err != nil {
			t.Fatal(f.err)
		}
		if f.missed > 0 {
			t.Errorf("%s got %d sse-missed", f.path, f.missed)
		}
		resumes += f.resumes
		for _, ch := range f.chans {
			inHistory := map[string]bool{}
			for _, p := range history[ch] {
				inHistory[p] = true
			}
			var got []string
			for _, p := range f.got[ch] {
				if inHistory[p] {
					got = append(got, p)
				} else {
					// Written by the killed master, delivered, then lost
					// with it before its replica had it.
					extras++
				}
			}
			delivered += len(got)
			if !slices.Equal(got, history[ch]) {
				t.Fatalf("%s on %s: received %d events, history holds %d; first difference at %d:\ngot  %q\nwant %q",
					f.path, ch, len(got), len(history[ch]), firstDiff(got, history[ch]),
					around(got, firstDiff(got, history[ch])), around(history[ch], firstDiff(got, history[ch])))
			}
		}
	}
	t.Logf("%d events in history (%.0f/s while publishing), %d delivered to 200 streams across %d resumes; %d received events were lost by Redis in the failover",
		total, float64(total)/publishing.Seconds(), delivered, resumes, extras)
	if extras > 40 {
		t.Fatalf("%d events delivered that history lost", extras)
	}
}

// slotOwners reads the cluster's slots once: the address of the master
// serving each.
func slotOwners(t *testing.T, cc *redis.ClusterClient) func(slot int) string {
	t.Helper()
	shards, err := cc.ClusterShards(context.Background()).Result()
	if err != nil {
		t.Fatal(err)
	}
	var owners [16384]string
	for _, sh := range shards {
		for _, n := range sh.Nodes {
			if n.Role == "master" && n.Health == "online" {
				for _, r := range sh.Slots {
					for s := r.Start; s <= r.End; s++ {
						owners[s] = net.JoinHostPort(n.IP, strconv.FormatInt(n.Port, 10))
					}
				}
			}
		}
	}
	return func(slot int) string { return owners[slot] }
}

// waitShardSubscribed waits until every channel has a shard subscriber on
// the master that serves it.
func waitShardSubscribed(t *testing.T, c *redistest.Cluster, cc *redis.ClusterClient, chans []string) {
	t.Helper()
	owner := slotOwners(t, cc)
	byAddr := map[string]*redistest.Server{}
	for _, n := range c.Nodes {
		byAddr[n.Addr()] = n
	}
	deadline := time.Now().Add(15 * time.Second)
	for _, ch := range chans {
		for {
			m := byAddr[owner(broker.Slot(ch))]
			if m == nil {
				t.Fatalf("%s is served by %q, none of the cluster's", ch, owner(broker.Slot(ch)))
			}
			n, err := m.Client().PubSubShardNumSub(context.Background(), ch).Result()
			if err == nil && n[ch] >= 1 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s has no shard subscriber on its master %s (%v)", ch, m.Addr(), err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

func firstDiff(a, b []string) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func around(s []string, i int) []string { return s[max(0, i-2):min(len(s), i+3)] }

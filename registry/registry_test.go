package registry

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/caddy-sse/caddy-sse/sse"
)

// waitFor bounds every wait for something that must happen.
const waitFor = 5 * time.Second

// call is one Subscribe or Unsubscribe the fake source received.
type call struct {
	op       string // "subscribe" or "unsubscribe"
	channels []string
}

// replayCall is one Replay the fake source received; the test answers it.
type replayCall struct {
	channels []string
	after    uint64
	reply    chan replayResult
}

type replayResult struct {
	msgs      []Message
	truncated bool
	err       error
}

// fakeSource is a Source that records every call in the order received and
// lets a test hold Subscribe (gate), fail it (fail), and answer Replay.
type fakeSource struct {
	mu    sync.Mutex
	calls []call
	gate  chan struct{} // when not nil, Subscribe waits for it to close
	fail  func(channels []string) error
	delay func() time.Duration

	entered  chan []string // when not nil, gets the channels of each Subscribe on entry
	returned atomic.Int64  // Subscribe calls that returned

	// replays, when not nil, gets every Replay call, to be answered on its
	// reply channel; when nil Replay returns nothing.
	replays chan replayCall
}

func (f *fakeSource) Subscribe(ctx context.Context, channels ...string) error {
	chs := slices.Clone(channels)
	f.mu.Lock()
	f.calls = append(f.calls, call{"subscribe", chs})
	gate, fail, delay, entered := f.gate, f.fail, f.delay, f.entered
	f.mu.Unlock()
	defer f.returned.Add(1)
	if entered != nil {
		entered <- chs
	}
	if delay != nil {
		time.Sleep(delay())
	}
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if fail != nil {
		return fail(chs)
	}
	return nil
}

func (f *fakeSource) Unsubscribe(channels ...string) {
	f.mu.Lock()
	f.calls = append(f.calls, call{"unsubscribe", slices.Clone(channels)})
	f.mu.Unlock()
}

func (f *fakeSource) Replay(ctx context.Context, channels []string, after uint64) ([]Message, bool, error) {
	if f.replays == nil {
		return nil, false, nil
	}
	c := replayCall{channels: slices.Clone(channels), after: after, reply: make(chan replayResult, 1)}
	select {
	case f.replays <- c:
	case <-ctx.Done():
		return nil, false, ctx.Err()
	}
	select {
	case res := <-c.reply:
		return res.msgs, res.truncated, res.err
	case <-ctx.Done():
		return nil, false, ctx.Err()
	}
}

// ReplayPage is not used by the registry itself: the streams page history.
func (f *fakeSource) ReplayPage(context.Context, []string, uint64, int64) (Page, error) {
	return Page{}, nil
}

// count returns how many calls of op named channel.
func (f *fakeSource) count(op, channel string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.calls {
		if c.op == op && slices.Contains(c.channels, channel) {
			n++
		}
	}
	return n
}

// subscribed replays the recorded calls in order and returns the channels
// left subscribed. It fails when a call subscribes a channel that is
// subscribed already or unsubscribes one that is not: the registry must send
// Redis each change exactly once.
func (f *fakeSource) subscribed(t *testing.T) map[string]bool {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	set := make(map[string]bool)
	for i, c := range f.calls {
		for _, ch := range c.channels {
			switch {
			case c.op == "subscribe" && set[ch]:
				t.Errorf("call %d subscribes %q, subscribed already", i, ch)
			case c.op == "unsubscribe" && !set[ch]:
				t.Errorf("call %d unsubscribes %q, not subscribed", i, ch)
			}
			set[ch] = c.op == "subscribe"
		}
	}
	for ch, on := range set {
		if !on {
			delete(set, ch)
		}
	}
	return set
}

func newRegistry(t testing.TB, src Source, m Metrics) *Registry {
	t.Helper()
	return startRegistry(t, Options{Source: src, Metrics: m})
}

func startRegistry(t testing.TB, opts Options) *Registry {
	t.Helper()
	r := New(opts)
	r.Start()
	t.Cleanup(r.Close)
	return r
}

func newDropped() *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{Name: "dropped_total"}, []string{"reason"})
}

func attach(t testing.TB, r *Registry, s *Subscriber) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if err := r.Attach(ctx, s); err != nil {
		t.Fatalf("Attach(%q): %v", s.Channels(), err)
	}
}

// eventually waits, with a bound, until cond holds.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// receive waits, with a bound, for a value on c.
func receive[T any](t *testing.T, what string, c <-chan T) T {
	t.Helper()
	select {
	case v := <-c:
		return v
	case <-time.After(waitFor):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

var barriers atomic.Int64

// barrier returns once the reconciler has acted on every attach and detach
// made before it: it attaches a new channel, which the reconciler handles in
// the same pass as anything dirty before it or in a later one.
func barrier(t *testing.T, r *Registry) {
	t.Helper()
	s := NewSubscriber([]string{"barrier:" + strconv.FormatInt(barriers.Add(1), 10)}, sse.FormatRaw, 1, false)
	attach(t, r, s)
	r.Detach(s)
}

func isBarrier(ch string) bool { return len(ch) > 8 && ch[:8] == "barrier:" }

func withoutBarriers(set map[string]bool) map[string]bool {
	out := make(map[string]bool)
	for ch, on := range set {
		if on && !isBarrier(ch) {
			out[ch] = true
		}
	}
	return out
}

func take(s *Subscriber) ([]*Frame, Reason) { return s.Take(nil) }

func seqs(frames []*Frame) []uint64 {
	out := make([]uint64, len(frames))
	for i, f := range frames {
		out[i] = f.Seq
	}
	return out
}

func msg(channel string, seq uint64) Message {
	return Message{Channel: channel, Payload: []byte("m" + strconv.FormatUint(seq, 10)), Seq: seq}
}

func woken(s *Subscriber) bool {
	select {
	case <-s.Wake():
		return true
	default:
		return false
	}
}

func TestAttachReturnsAfterSubscribe(t *testing.T) {
	gate := make(chan struct{})
	src := &fakeSource{gate: gate, entered: make(chan []string, 1)}
	r := newRegistry(t, src, Metrics{})
	s := NewSubscriber([]string{"b", "a"}, sse.FormatRaw, 8, false)
	done := make(chan error, 1)
	go func() { done <- r.Attach(context.Background(), s) }()

	chs := receive(t, "Subscribe", src.entered)
	sort.Strings(chs)
	if !slices.Equal(chs, []string{"a", "b"}) {
		t.Errorf("Subscribe(%q), want one call with both channels", chs)
	}
	select {
	case err := <-done:
		t.Fatalf("Attach returned (%v) while Subscribe had not", err)
	case <-time.After(20 * time.Millisecond):
	}
	close(gate)
	if err := receive(t, "Attach", done); err != nil {
		t.Fatalf("Attach: %v", err)
	}
	if n := src.returned.Load(); n != 1 {
		t.Fatalf("Attach returned after %d returned Subscribe calls, want 1", n)
	}
}

func TestSecondAttachDoesNotSubscribeAgain(t *testing.T) {
	src := &fakeSource{}
	r := newRegistry(t, src, Metrics{})
	attach(t, r, NewSubscriber([]string{"a"}, sse.FormatRaw, 8, false))
	attach(t, r, NewSubscriber([]string{"a", "b"}, sse.FormatRaw, 8, false))
	attach(t, r, NewSubscriber([]string{"b"}, sse.FormatEnvelope, 8, true))
	if n := src.count("subscribe", "a"); n != 1 {
		t.Errorf("a subscribed %d times, want 1", n)
	}
	if n := src.count("subscribe", "b"); n != 1 {
		t.Errorf("b subscribed %d times, want 1", n)
	}
	st := r.Snapshot()
	if st.Channels != 2 || st.Subscribers["a"] != 2 || st.Subscribers["b"] != 2 {
		t.Errorf("Snapshot = %+v, want a and b with 2 subscribers each", st)
	}
}

// A channel whose last listener leaves and a new one comes before the
// reconciler acts stays subscribed: no UNSUBSCRIBE, no second SUBSCRIBE, and
// the new Attach returns.
func TestReattachBeforeReconcile(t *testing.T) {
	src := &fakeSource{entered: make(chan []string, 8)}
	r := newRegistry(t, src, Metrics{})
	old := NewSubscriber([]string{"a"}, sse.FormatRaw, 8, false)
	attach(t, r, old)
	receive(t, "Subscribe a", src.entered)

	// Keep the reconciler busy with another channel meanwhile.
	gate := make(chan struct{})
	src.mu.Lock()
	src.gate = gate
	src.mu.Unlock()
	busy := make(chan error, 1)
	go func() {
		busy <- r.Attach(context.Background(), NewSubscriber([]string{"busy"}, sse.FormatRaw, 8, false))
	}()
	receive(t, "Subscribe busy", src.entered)

	r.Detach(old)
	s := NewSubscriber([]string{"a"}, sse.FormatRaw, 8, false)
	done := make(chan error, 1)
	go func() { done <- r.Attach(context.Background(), s) }()
	eventually(t, "a re-attached", func() bool { return r.Snapshot().Subscribers["a"] == 1 })
	close(gate)
	if err := receive(t, "Attach busy", busy); err != nil {
		t.Fatal(err)
	}
	if err := receive(t, "Attach a again", done); err != nil {
		t.Fatal(err)
	}
	barrier(t, r)
	if n, m := src.count("subscribe", "a"), src.count("unsubscribe", "a"); n != 1 || m != 0 {
		t.Fatalf("a subscribed %d and unsubscribed %d times, want 1 and 0", n, m)
	}
	r.Deliver(msg("a", 0))
	if frames, _ := take(s); len(frames) != 1 {
		t.Fatalf("got %d frames, want 1", len(frames))
	}
}

func TestSubscribeErrorStillAttaches(t *testing.T) {
	src := &fakeSource{fail: func([]string) error { return errors.New("redis down") }}
	r := newRegistry(t, src, Metrics{})
	s := NewSubscriber([]string{"a"}, sse.FormatRaw, 8, false)
	attach(t, r, s) // the source subscribes later; the stream goes on
	r.Deliver(msg("a", 0))
	if frames, _ := take(s); len(frames) != 1 {
		t.Fatalf("got %d frames, want 1", len(frames))
	}
}

func TestConcurrentAttachSubscribesOnce(t *testing.T) {
	const n = 100
	gate := make(chan struct{})
	src := &fakeSource{gate: gate}
	r := newRegistry(t, src, Metrics{})

	subs := make([]*Subscriber, n)
	var returned atomic.Int64
	errs := make(chan error, n)
	start := make(chan struct{})
	for i := range subs {
		subs[i] = NewSubscriber([]string{"room"}, sse.FormatRaw, 8, false)
		go func() {
			<-start
			err := r.Attach(context.Background(), subs[i])
			returned.Add(1)
			errs <- err
		}()
	}
	close(start)
	eventually(t, "100 subscribers on room", func() bool { return r.Snapshot().Subscribers["room"] == n })
	if k := returned.Load(); k != 0 {
		t.Fatalf("%d Attach calls returned before Subscribe did", k)
	}
	close(gate)
	for range n {
		if err := receive(t, "Attach", errs); err != nil {
			t.Fatalf("Attach: %v", err)
		}
	}
	if k := src.count("subscribe", "room"); k != 1 {
		t.Fatalf("room subscribed %d times, want 1", k)
	}

	var wg sync.WaitGroup
	for _, s := range subs {
		wg.Go(func() { r.Detach(s) })
	}
	wg.Wait()
	if st := r.Snapshot(); st.Channels != 0 {
		t.Fatalf("after detaching all: %+v", st)
	}
	barrier(t, r)
	if k := src.count("unsubscribe", "room"); k != 1 {
		t.Fatalf("room unsubscribed %d times, want 1", k)
	}
	if k := src.count("subscribe", "room"); k != 1 {
		t.Fatalf("room subscribed %d times, want 1", k)
	}
}

// TestAttachDetachRace attaches and detaches from many goroutines while
// messages are delivered, then checks, from the order of the calls the
// source received, that exactly the channels with listeners are subscribed.
func TestAttachDetachRace(t *testing.T) {
	channels := []string{"c0", "c1", "c2", "c3", "c4"}
	var failures atomic.Int64
	src := &fakeSource{
		delay: func() time.Duration { return time.Duration(rand.IntN(50)) * time.Microsecond },
		fail: func([]string) error {
			if rand.IntN(10) == 0 {
				failures.Add(1)
				return errors.New("flaky")
			}
			return nil
		},
	}
	r := newRegistry(t, src, Metrics{Dropped: newDropped()})

	stop := make(chan struct{})
	delivered := make(chan struct{})
	go func() {
		defer close(delivered)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			r.Deliver(Message{Channel: channels[i%len(channels)], Payload: []byte("x")})
		}
	}()

	const workers, ops = 32, 200
	held := make([][]*Subscriber, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			var mine []*Subscriber
			for range ops {
				if len(mine) > 0 && rng.IntN(2) == 0 {
					i := rng.IntN(len(mine))
					r.Detach(mine[i])
					mine = slices.Delete(mine, i, i+1)
					continue
				}
				chs := []string{channels[rng.IntN(len(channels))]}
				if c := channels[rng.IntN(len(channels))]; c != chs[0] && rng.IntN(2) == 0 {
					chs = append(chs, c)
				}
				s := NewSubscriber(chs, sse.FormatRaw, 4, rng.IntN(2) == 0)
				ctx, cancel := context.WithTimeout(context.Background(), waitFor)
				if rng.IntN(8) == 0 {
					cancel() // some give up at once
				}
				if err := r.Attach(ctx, s); err == nil {
					mine = append(mine, s)
				} else if !errors.Is(err, context.Canceled) {
					t.Errorf("Attach: %v", err)
				}
				cancel()
			}
			held[w] = mine
		})
	}
	wg.Wait()
	close(stop)
	<-delivered

	check := func(want map[string]bool) {
		t.Helper()
		barrier(t, r)
		got := withoutBarriers(src.subscribed(t))
		if !maps(got, want) {
			t.Fatalf("subscribed %v, want %v", keys(got), keys(want))
		}
		snap := make(map[string]bool)
		for ch := range r.Snapshot().Subscribers {
			snap[ch] = true
		}
		if !maps(snap, want) {
			t.Fatalf("registry holds %v, want %v", keys(snap), keys(want))
		}
	}
	want := make(map[string]bool)
	for _, mine := range held {
		for _, s := range mine {
			for _, ch := range s.Channels() {
				want[ch] = true
			}
		}
	}
	check(want)

	for _, mine := range held {
		for _, s := range mine {
			r.Detach(s)
		}
	}
	check(map[string]bool{})
	src.mu.Lock()
	n := len(src.calls)
	src.mu.Unlock()
	t.Logf("%d calls, %d failed subscribes", n, failures.Load())
}

func maps(a, b map[string]bool) bool {
	if len(a) != len(b) {
		return false
	}
	for k := range a {
		if !b[k] {
			return false
		}
	}
	return true
}

func keys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func TestAttachContextCancelled(t *testing.T) {
	gate := make(chan struct{})
	src := &fakeSource{entered: make(chan []string, 4)}
	r := newRegistry(t, src, Metrics{})
	stay := NewSubscriber([]string{"a"}, sse.FormatRaw, 8, false)
	attach(t, r, stay)
	receive(t, "Subscribe a", src.entered)

	src.mu.Lock()
	src.gate = gate
	src.mu.Unlock()
	s := NewSubscriber([]string{"a", "slow"}, sse.FormatRaw, 8, false)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Attach(ctx, s) }()
	if chs := receive(t, "Subscribe slow", src.entered); !slices.Equal(chs, []string{"slow"}) {
		t.Fatalf("Subscribe(%q), want slow", chs)
	}
	cancel()
	if err := receive(t, "Attach", done); !errors.Is(err, context.Canceled) {
		t.Fatalf("Attach = %v, want context.Canceled", err)
	}
	if st := r.Snapshot(); st.Channels != 1 || st.Subscribers["a"] != 1 {
		t.Fatalf("Snapshot = %+v, want only the other subscriber of a", st)
	}
	r.Deliver(msg("a", 0))
	r.Deliver(msg("slow", 0))
	if frames, _ := take(s); len(frames) != 0 {
		t.Errorf("cancelled subscriber got %d frames", len(frames))
	}
	if frames, _ := take(stay); len(frames) != 1 {
		t.Errorf("attached subscriber got %d frames, want 1", len(frames))
	}

	close(gate)
	barrier(t, r)
	if got := withoutBarriers(src.subscribed(t)); !maps(got, map[string]bool{"a": true}) {
		t.Fatalf("subscribed %v, want [a]", keys(got))
	}
}

func TestDeliverEncodesOncePerFormat(t *testing.T) {
	src := &fakeSource{}
	r := newRegistry(t, src, Metrics{})
	raw1 := NewSubscriber([]string{"a"}, sse.FormatRaw, 8, false)
	raw2 := NewSubscriber([]string{"b", "a"}, sse.FormatRaw, 8, false)
	env1 := NewSubscriber([]string{"a"}, sse.FormatEnvelope, 8, false)
	env2 := NewSubscriber([]string{"a"}, sse.FormatEnvelope, 8, true)
	other := NewSubscriber([]string{"b"}, sse.FormatRaw, 8, false)
	unknown := NewSubscriber([]string{"a"}, sse.Format(7), 8, false)
	for _, s := range []*Subscriber{raw1, raw2, env1, env2, other, unknown} {
		attach(t, r, s)
		woken(s) // clear
	}

	payload := `{"event":"greet","data":"hi"}`
	r.Deliver(Message{Channel: "a", Payload: []byte(payload), Seq: 7})

	one := func(name string, s *Subscriber) *Frame {
		t.Helper()
		if !woken(s) {
			t.Errorf("%s not woken", name)
		}
		frames, why := take(s)
		if len(frames) != 1 || why != "" {
			t.Fatalf("%s: %d frames, reason %q; want 1 frame", name, len(frames), why)
		}
		return frames[0]
	}
	r1, r2, u := one("raw1", raw1), one("raw2", raw2), one("unknown", unknown)
	e1, e2 := one("env1", env1), one("env2", env2)
	if r1 != r2 || r1 != u {
		t.Error("raw subscribers got different frames: encoded more than once")
	}
	if e1 != e2 {
		t.Error("envelope subscribers got different frames: encoded more than once")
	}
	if r1 == e1 {
		t.Error("raw and envelope subscribers share a frame")
	}
	if want := "id: 7\ndata: " + payload + "\n\n"; string(r1.Bytes) != want {
		t.Errorf("raw frame %q, want %q", r1.Bytes, want)
	}
	if want := "id: 7\nevent: greet\ndata: hi\n\n"; string(e1.Bytes) != want {
		t.Errorf("envelope frame %q, want %q", e1.Bytes, want)
	}
	if r1.Seq != 7 || e1.Seq != 7 || r1.Close || e1.Close {
		t.Errorf("frames %+v %+v, want Seq 7, not closing", r1, e1)
	}
	if woken(other) {
		t.Error("subscriber of b woken by a message to a")
	}
	if frames, _ := take(other); len(frames) != 0 {
		t.Errorf("subscriber of b got %d frames of a", len(frames))
	}

	// Nobody listens: nothing happens.
	r.Deliver(msg("nobody", 0))
}

func TestFaultsCounted(t *testing.T) {
	faults := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "faults_total"}, []string{"reason"})
	r := newRegistry(t, &fakeSource{}, Metrics{Faults: faults})
	s1 := NewSubscriber([]string{"a"}, sse.FormatEnvelope, 8, false)
	s2 := NewSubscriber([]string{"a"}, sse.FormatEnvelope, 8, false)
	attach(t, r, s1)
	attach(t, r, s2)
	r.Deliver(Message{Channel: "a", Payload: []byte("not json")})
	var total float64
	for _, reason := range sse.FaultBadEnvelope.Reasons() {
		total += testutil.ToFloat64(faults.WithLabelValues(reason))
	}
	if total != 1 {
		t.Fatalf("bad envelope counted %v times for two subscribers, want once", total)
	}
}

func TestOverflow(t *testing.T) {
	const buffer = 4
	dropped := newDropped()
	r := newRegistry(t, &fakeSource{}, Metrics{Dropped: dropped})
	slow := NewSubscriber([]string{"a"}, sse.FormatRaw, buffer, false)
	fast := NewSubscriber([]string{"a"}, sse.FormatRaw, buffer, false)
	attach(t, r, slow)
	attach(t, r, fast)

	var got []uint64
	var buf []*Frame
	for seq := uint64(1); seq <= 10; seq++ {
		r.Deliver(msg("a", seq))
		frames, why := fast.Take(buf)
		if why != "" {
			t.Fatalf("fast subscriber ends: %s", why)
		}
		got = append(got, seqs(frames)...)
		clear(frames)
		buf = frames
		if seq == buffer {
			if n := testutil.ToFloat64(dropped.WithLabelValues(string(ReasonOverflow))); n != 0 {
				t.Fatalf("%v drops with a full but not overflowing queue", n)
			}
		}
	}
	if want := []uint64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}; !slices.Equal(got, want) {
		t.Errorf("fast subscriber got %v, want %v", got, want)
	}
	if !woken(slow) {
		t.Error("slow subscriber not woken")
	}
	frames, why := take(slow)
	if why != ReasonOverflow {
		t.Errorf("slow subscriber reason %q, want %q", why, ReasonOverflow)
	}
	if want := []uint64{1, 2, 3, 4}; !slices.Equal(seqs(frames), want) {
		t.Errorf("slow subscriber got %v, want %v", seqs(frames), want)
	}
	if n := testutil.ToFloat64(dropped.WithLabelValues(string(ReasonOverflow))); n != 10-buffer {
		t.Errorf("dropped{overflow} = %v, want %d", n, 10-buffer)
	}
}

func TestEnvelopeClose(t *testing.T) {
	dropped := newDropped()
	var closed []string
	r := startRegistry(t, Options{
		Source:  &fakeSource{},
		Metrics: Metrics{Dropped: dropped},
		OnClose: func(ch string) { closed = append(closed, ch) },
	})
	env := NewSubscriber([]string{"a"}, sse.FormatEnvelope, 8, false)
	bare := NewSubscriber([]string{"b"}, sse.FormatEnvelope, 8, false)
	raw := NewSubscriber([]string{"a"}, sse.FormatRaw, 8, false)
	for _, s := range []*Subscriber{env, bare, raw} {
		attach(t, r, s)
	}

	r.Deliver(Message{Channel: "a", Payload: []byte(`{"data":"bye","close":true}`)})
	r.Deliver(Message{Channel: "b", Payload: []byte(`{"close":true}`)})
	r.Deliver(Message{Channel: "a", Payload: []byte(`{"data":"after"}`)})

	frames, why := take(env)
	if why != ReasonClosed {
		t.Errorf("reason %q, want %q", why, ReasonClosed)
	}
	if len(frames) != 1 || string(frames[0].Bytes) != "data: bye\n\n" || !frames[0].Close {
		t.Fatalf("envelope subscriber got %d frames (%+v), want the closing frame only", len(frames), frames)
	}
	frames, why = take(bare)
	if why != ReasonClosed || len(frames) != 1 || len(frames[0].Bytes) != 0 || !frames[0].Close {
		t.Errorf("bare close: %+v, %q; want one empty closing frame and %q", frames, why, ReasonClosed)
	}
	// A raw stream sends the envelope as data and stays open.
	if frames, why := take(raw); why != "" || len(frames) != 2 || frames[0].Close {
		t.Errorf("raw subscriber: %d frames, reason %q; want 2 frames and open", len(frames), why)
	}
	// The closed streams left the channel: the event after the close is
	// not even offered to them.
	if n := testutil.ToFloat64(dropped.WithLabelValues(string(ReasonClosed))); n != 0 {
		t.Errorf("dropped{closed} = %v, want 0", n)
	}
	if st := r.Snapshot(); st.Subscribers["a"] != 1 || st.Subscribers["b"] != 0 {
		t.Errorf("subscribers after the closes: %v, want a: 1 (the raw stream), b gone", st.Subscribers)
	}
	if !slices.Equal(closed, []string{"a", "b"}) {
		t.Errorf("OnClose got %q, want [a b]", closed)
	}
}

// reconnect runs Reconnected in the background and returns the Replay it
// makes, and a channel closed when Reconnected returns.
func reconnect(t *testing.T, r *Registry, src *fakeSource) (replayCall, <-chan struct{}) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		ctx, cancel := context.WithTimeout(context.Background(), waitFor)
		defer cancel()
		r.Reconnected(ctx)
	}()
	return receive(t, "Replay", src.replays), done
}

func TestReconnectedCatchUp(t *testing.T) {
	src := &fakeSource{replays: make(chan replayCall)}
	r := newRegistry(t, src, Metrics{})
	hist := NewSubscriber([]string{"a", "b"}, sse.FormatRaw, 64, true)
	plain := NewSubscriber([]string{"p"}, sse.FormatRaw, 64, false)
	attach(t, r, hist)
	attach(t, r, plain)
	for seq := uint64(1); seq <= 3; seq++ {
		r.Deliver(msg("a", seq))
	}
	take(hist)

	// Lost in the outage: a:4, b:5. Published after the resubscription and
	// so received live while catching up: a:6, then b:7 and a plain
	// message; a:6 is also in the history read back.
	rc, done := reconnect(t, r, src)
	sort.Strings(rc.channels)
	if !slices.Equal(rc.channels, []string{"a", "b"}) || rc.after != 3 {
		t.Errorf("Replay(%q, %d), want the history channels after 3", rc.channels, rc.after)
	}
	r.Deliver(msg("a", 6))
	r.Deliver(msg("b", 7))
	r.Deliver(msg("b", 0))
	r.Deliver(msg("p", 0))
	if frames, _ := take(hist); len(frames) != 0 {
		t.Fatalf("live frames %v delivered before the catch-up", seqs(frames))
	}
	rc.reply <- replayResult{msgs: []Message{msg("a", 4), msg("b", 5), msg("a", 6)}}
	receive(t, "Reconnected", done)

	frames, _ := take(hist)
	if want := []uint64{4, 5, 6, 7, 0}; !slices.Equal(seqs(frames), want) {
		t.Fatalf("got %v, want %v", seqs(frames), want)
	}
	for i, want := range []string{"m4", "m5", "m6", "m7", "m0"} {
		if !bytes.Contains(frames[i].Bytes, []byte("data: "+want+"\n")) {
			t.Errorf("frame %d is %q, want %s", i, frames[i].Bytes, want)
		}
	}
	if frames, _ := take(plain); len(frames) != 1 {
		t.Errorf("plain subscriber got %d frames, want 1", len(frames))
	}

	// Live again: straight through, duplicates skipped.
	r.Deliver(msg("a", 7))
	r.Deliver(msg("a", 8))
	if frames, _ := take(hist); !slices.Equal(seqs(frames), []uint64{8}) {
		t.Errorf("after catch-up got %v, want [8]", seqs(frames))
	}
}

func TestReconnectedTruncated(t *testing.T) {
	for _, tc := range []struct {
		name string
		res  replayResult
		want []uint64
	}{
		{"truncated", replayResult{msgs: []Message{msg("a", 8), msg("a", 9)}, truncated: true}, []uint64{0, 8, 9, 10}},
		{"error", replayResult{err: errors.New("redis down")}, []uint64{0, 10}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := &fakeSource{replays: make(chan replayCall)}
			r := newRegistry(t, src, Metrics{})
			s := NewSubscriber([]string{"a"}, sse.FormatRaw, 64, true)
			attach(t, r, s)
			r.Deliver(msg("a", 3))
			take(s)

			rc, done := reconnect(t, r, src)
			r.Deliver(msg("a", 10))
			rc.reply <- tc.res
			receive(t, "Reconnected", done)

			frames, _ := take(s)
			if !slices.Equal(seqs(frames), tc.want) {
				t.Fatalf("got %v, want %v", seqs(frames), tc.want)
			}
			if !bytes.Equal(frames[0].Bytes, MissedFrame(3).Bytes) {
				t.Errorf("first frame %q, want the missed frame %q", frames[0].Bytes, MissedFrame(3).Bytes)
			}
			if !bytes.Contains(frames[0].Bytes, []byte("event: "+MissedEvent+"\n")) ||
				bytes.Contains(frames[0].Bytes, []byte("id:")) {
				t.Errorf("missed frame %q: want event %s and no id", frames[0].Bytes, MissedEvent)
			}
		})
	}
}

// A live message of a channel that is not read back must not be taken for a
// duplicate because a read-back message has a higher number.
func TestReconnectedLiveOfChannelNotReadBack(t *testing.T) {
	src := &fakeSource{replays: make(chan replayCall)}
	r := newRegistry(t, src, Metrics{})
	hist := NewSubscriber([]string{"a"}, sse.FormatRaw, 64, true)
	plain := NewSubscriber([]string{"b"}, sse.FormatRaw, 64, false) // b: no history wanted
	both := NewSubscriber([]string{"a", "b"}, sse.FormatRaw, 64, false)
	for _, s := range []*Subscriber{hist, plain, both} {
		attach(t, r, s)
	}
	r.Deliver(msg("a", 10))
	take(hist)
	take(both)

	rc, done := reconnect(t, r, src)
	// a:11 and a:12 lost; a plain message, b:13 and a:14 published after
	// the resubscription, a:14 also read back.
	r.Deliver(msg("a", 0))
	r.Deliver(msg("b", 13))
	r.Deliver(msg("a", 14))
	rc.reply <- replayResult{msgs: []Message{msg("a", 11), msg("a", 12), msg("a", 14)}}
	receive(t, "Reconnected", done)

	for _, tc := range []struct {
		name string
		s    *Subscriber
		want []uint64
	}{
		{"history a", hist, []uint64{11, 12, 0, 14}},
		{"plain b", plain, []uint64{13}},
		{"a and b", both, []uint64{11, 12, 0, 13, 14}},
	} {
		if frames, _ := take(tc.s); !slices.Equal(seqs(frames), tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, seqs(frames), tc.want)
		}
	}
}

// The connection can drop again while a catch-up reads history: nothing live
// may go out before the last catch-up is done, or it would make the second
// catch-up's events look like duplicates.
func TestReconnectedOverlapping(t *testing.T) {
	src := &fakeSource{replays: make(chan replayCall)}
	r := newRegistry(t, src, Metrics{})
	s := NewSubscriber([]string{"a"}, sse.FormatRaw, 64, true)
	attach(t, r, s)
	r.Deliver(msg("a", 10))
	take(s)

	r.Disconnected()
	rc1, done1 := reconnect(t, r, src)
	r.Deliver(msg("a", 11))
	r.Deliver(msg("a", 12))
	r.Disconnected() // dropped again during the catch-up: 13..19 lost
	rc2, done2 := reconnect(t, r, src)
	if rc1.after != 10 || rc2.after != 10 {
		t.Errorf("Replay after %d and %d, want 10 and 10", rc1.after, rc2.after)
	}
	r.Deliver(msg("a", 20))
	rc1.reply <- replayResult{msgs: []Message{msg("a", 11), msg("a", 12)}}
	receive(t, "first Reconnected", done1)
	if frames, _ := take(s); len(frames) != 0 {
		t.Fatalf("frames %v delivered while a catch-up was still under way", seqs(frames))
	}
	r.Deliver(msg("a", 21))
	var gap []Message
	for seq := uint64(11); seq <= 20; seq++ {
		gap = append(gap, msg("a", seq))
	}
	rc2.reply <- replayResult{msgs: gap}
	receive(t, "second Reconnected", done2)

	var want []uint64
	for seq := uint64(11); seq <= 21; seq++ {
		want = append(want, seq)
	}
	if frames, _ := take(s); !slices.Equal(seqs(frames), want) {
		t.Fatalf("got %v, want %v", seqs(frames), want)
	}
}

// Live messages read on the new connection before the catch-up starts must
// not move the catch-up's starting point past the gap.
func TestDisconnectedHoldsLiveUntilCatchUp(t *testing.T) {
	src := &fakeSource{replays: make(chan replayCall)}
	r := newRegistry(t, src, Metrics{})
	s := NewSubscriber([]string{"a"}, sse.FormatRaw, 64, true)
	attach(t, r, s)
	r.Deliver(msg("a", 10))
	take(s)
	r.Disconnected()
	// 11..14 were published during the gap; 15 arrives on the new
	// connection before HandleReconnect runs.
	r.Deliver(msg("a", 15))
	if frames, _ := take(s); len(frames) != 0 {
		t.Fatalf("frames %v delivered before the catch-up", seqs(frames))
	}
	rc, done := reconnect(t, r, src)
	if rc.after != 10 {
		t.Fatalf("catch-up after %d, want 10", rc.after)
	}
	rc.reply <- replayResult{msgs: []Message{msg("a", 11), msg("a", 12), msg("a", 13), msg("a", 14), msg("a", 15)}}
	receive(t, "Reconnected", done)
	if frames, _ := take(s); !slices.Equal(seqs(frames), []uint64{11, 12, 13, 14, 15}) {
		t.Fatalf("got %v, want [11 12 13 14 15]", seqs(frames))
	}
}

func TestReconnectedWithoutHistory(t *testing.T) {
	src := &fakeSource{replays: make(chan replayCall)}
	r := newRegistry(t, src, Metrics{})
	s := NewSubscriber([]string{"a"}, sse.FormatRaw, 8, false)
	attach(t, r, s)
	r.Deliver(msg("a", 5))
	take(s)
	r.Reconnected(context.Background()) // no Replay: the fake would block
	r.Deliver(msg("a", 6))
	if frames, _ := take(s); !slices.Equal(seqs(frames), []uint64{6}) {
		t.Fatalf("got %v, want [6]", seqs(frames))
	}
}

func TestClose(t *testing.T) {
	src := &fakeSource{}
	r := New(Options{Source: src})
	r.Start()
	subs := []*Subscriber{
		NewSubscriber([]string{"a"}, sse.FormatRaw, 8, false),
		NewSubscriber([]string{"a", "b"}, sse.FormatEnvelope, 8, true),
		NewSubscriber([]string{"c"}, sse.FormatRaw, 8, false),
	}
	for _, s := range subs {
		attach(t, r, s)
	}
	r.Deliver(msg("a", 1))
	r.Close()
	for i, s := range subs {
		if !woken(s) {
			t.Errorf("subscriber %d not woken", i)
		}
		frames, why := take(s)
		if why != ReasonShutdown {
			t.Errorf("subscriber %d: reason %q, want %q", i, why, ReasonShutdown)
		}
		if i < 2 && len(frames) != 1 {
			t.Errorf("subscriber %d: %d frames, want the one queued before Close", i, len(frames))
		}
	}
	err := r.Attach(context.Background(), NewSubscriber([]string{"a"}, sse.FormatRaw, 8, false))
	if !errors.Is(err, ErrClosed) {
		t.Errorf("Attach after Close = %v, want ErrClosed", err)
	}
	r.Close() // twice is fine
}

// An Attach whose channels the reconciler had not subscribed yet when Close
// stopped it must not wait for them forever.
func TestAttachDuringClose(t *testing.T) {
	for i := range 20 {
		gate := make(chan struct{})
		src := &fakeSource{gate: gate, entered: make(chan []string, 4)}
		r := New(Options{Source: src})
		r.Start()
		first := make(chan error, 1)
		go func() { first <- r.Attach(context.Background(), NewSubscriber([]string{"a"}, sse.FormatRaw, 8, false)) }()
		receive(t, "Subscribe a", src.entered) // the reconciler is now busy

		s := NewSubscriber([]string{"b"}, sse.FormatRaw, 8, false)
		second := make(chan error, 1)
		go func() { second <- r.Attach(context.Background(), s) }()
		eventually(t, "b attached", func() bool { return r.Snapshot().Subscribers["b"] == 1 })

		closed := make(chan struct{})
		go func() { r.Close(); close(closed) }()
		eventually(t, "Close to stop the reconciler", func() bool {
			select {
			case <-r.done:
				return true
			default:
				return false
			}
		})
		close(gate)
		receive(t, fmt.Sprintf("round %d: Close", i), closed)
		receive(t, fmt.Sprintf("round %d: first Attach", i), first)
		if err := receive(t, fmt.Sprintf("round %d: Attach of b during Close", i), second); err != nil && !errors.Is(err, ErrClosed) {
			t.Fatalf("Attach = %v, want nil or ErrClosed", err)
		}
		if _, why := take(s); why != ReasonShutdown {
			t.Fatalf("reason %q, want %q", why, ReasonShutdown)
		}
	}
}

// New starts nothing, so that whoever builds the registry can finish its
// source first; Close works started or not, and Start after it does nothing.
func TestStart(t *testing.T) {
	src := &fakeSource{}
	r := New(Options{Source: src})
	func() {
		defer func() {
			if recover() == nil {
				t.Error("Attach before Start did not panic")
			}
		}()
		_ = r.Attach(context.Background(), NewSubscriber([]string{"a"}, sse.FormatRaw, 8, false))
	}()
	r.Start()
	r.Start() // twice is fine
	attach(t, r, NewSubscriber([]string{"a"}, sse.FormatRaw, 8, false))
	r.Close()
	if n := src.count("subscribe", "a"); n != 1 {
		t.Errorf("a subscribed %d times, want 1", n)
	}

	unstarted := New(Options{Source: src})
	unstarted.Close()
	unstarted.Start()
	if err := unstarted.Attach(context.Background(), NewSubscriber([]string{"b"}, sse.FormatRaw, 8, false)); !errors.Is(err, ErrClosed) {
		t.Errorf("Attach after Close = %v, want ErrClosed", err)
	}
}

func TestDetachTwice(t *testing.T) {
	src := &fakeSource{}
	r := newRegistry(t, src, Metrics{})
	s1 := NewSubscriber([]string{"a"}, sse.FormatRaw, 8, false)
	s2 := NewSubscriber([]string{"a"}, sse.FormatRaw, 8, false)
	attach(t, r, s1)
	attach(t, r, s2)
	r.Detach(s1)
	r.Detach(s1)
	if st := r.Snapshot(); st.Subscribers["a"] != 1 {
		t.Fatalf("Snapshot = %+v, want a with 1 subscriber", st)
	}
	barrier(t, r)
	if n := src.count("unsubscribe", "a"); n != 0 {
		t.Fatalf("a unsubscribed while s2 listens")
	}
}

// Delivery allocates per message, never per subscriber.
func TestDeliverAllocationsIndependentOfSubscribers(t *testing.T) {
	allocs := func(n int) float64 {
		r := newRegistry(t, &fakeSource{}, Metrics{})
		subs := make([]*Subscriber, n)
		bufs := make([][]*Frame, n)
		for i := range subs {
			subs[i] = NewSubscriber([]string{"a"}, sse.FormatRaw, 4, false)
			attach(t, r, subs[i])
			// Take swaps the queue with the buffer given: two buffers
			// ping-pong, so the queue always has room.
			subs[i].Take(make([]*Frame, 0, 4))
			bufs[i] = make([]*Frame, 0, 4)
		}
		m := Message{Channel: "a", Payload: []byte("hello")}
		return testing.AllocsPerRun(50, func() {
			r.Deliver(m)
			for i, s := range subs {
				frames, _ := s.Take(bufs[i])
				clear(frames)
				bufs[i] = frames
			}
		})
	}
	small, large := allocs(10), allocs(1000)
	if small != large {
		t.Fatalf("Deliver allocates %v times with 10 subscribers and %v with 1000", small, large)
	}
}

// A publisher's close ends its channel only: a stream on two channels goes
// on with the other one, and ends when both are closed.
func TestCloseEndsThatChannelOnly(t *testing.T) {
	r := newRegistry(t, &fakeSource{}, Metrics{})
	s := NewSubscriber([]string{"a", "b"}, sse.FormatEnvelope, 8, false)
	attach(t, r, s)

	r.Deliver(Message{Channel: "a", Payload: []byte(`{"data":"bye","close":true}`)})
	r.Deliver(Message{Channel: "a", Payload: []byte(`{"data":"late"}`)})
	r.Deliver(Message{Channel: "b", Payload: []byte(`{"data":"on b"}`)})
	frames, why := take(s)
	if why != "" || len(frames) != 2 || string(frames[0].Bytes) != "data: bye\n\n" || string(frames[1].Bytes) != "data: on b\n\n" {
		t.Fatalf("after closing a: %d frames, reason %q; want bye and on b, still open", len(frames), why)
	}
	r.Deliver(Message{Channel: "b", Payload: []byte(`{"close":true}`)})
	if _, why := take(s); why != ReasonClosed {
		t.Errorf("after closing b too: reason %q, want %q", why, ReasonClosed)
	}
}

// On a stream with history, an id is always a resume id: a publisher's own
// envelope id goes out only on streams without history.
func TestHistoryStreamsSendOnlyResumeIDs(t *testing.T) {
	r := newRegistry(t, &fakeSource{}, Metrics{})
	hist := NewSubscriber([]string{"a"}, sse.FormatEnvelope, 8, true)
	plain := NewSubscriber([]string{"a"}, sse.FormatEnvelope, 8, false)
	attach(t, r, hist)
	attach(t, r, plain)
	r.Deliver(Message{Channel: "a", Payload: []byte(`{"id":"999","data":"x"}`)})
	r.Deliver(Message{Channel: "a", Payload: []byte(`{"id":"999","data":"y"}`), Seq: 7})
	got := func(s *Subscriber) []string {
		frames, _ := take(s)
		var out []string
		for _, f := range frames {
			out = append(out, string(f.Bytes))
		}
		return out
	}
	if g, want := got(hist), []string{"data: x\n\n", "id: 7\ndata: y\n\n"}; !slices.Equal(g, want) {
		t.Errorf("history stream got %q, want %q", g, want)
	}
	if g, want := got(plain), []string{"id: 999\ndata: x\n\n", "id: 7\ndata: y\n\n"}; !slices.Equal(g, want) {
		t.Errorf("stream without history got %q, want %q", g, want)
	}
}

// While a stream replays history, resumable frames that find its queue full
// are left to the replay instead of overflowing it; plain ones still count.
func TestReplayingLeavesResumableFramesToHistory(t *testing.T) {
	r := newRegistry(t, &fakeSource{}, Metrics{})
	s := NewSubscriber([]string{"a"}, sse.FormatRaw, 2, true)
	s.Replaying()
	attach(t, r, s)
	for i := uint64(1); i <= 5; i++ {
		r.Deliver(Message{Channel: "a", Payload: []byte("x"), Seq: i})
	}
	if s.Reason() != "" {
		t.Fatalf("reason %q while replaying, want none", s.Reason())
	}
	if s.EndReplay() {
		t.Fatal("EndReplay after skipped frames: true, want false (read history again)")
	}
	if !s.EndReplay() {
		t.Fatal("second EndReplay: false, want true")
	}
	r.Deliver(Message{Channel: "a", Payload: []byte("x"), Seq: 6})
	if s.Reason() != ReasonOverflow {
		t.Errorf("reason %q after the replay with a full queue, want %q", s.Reason(), ReasonOverflow)
	}
}

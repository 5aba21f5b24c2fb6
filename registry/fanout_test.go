package registry

import (
	"runtime"
	"strconv"
	"testing"

	"github.com/caddy-sse/caddy-sse/sse"
)

// A channel large enough to be split across goroutines: every subscriber
// gets every frame once, in order, each kind of frame encoded once per
// message, and an envelope's close reaches every part.
func TestFanOutSplitAcrossCores(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(4))
	r := newRegistry(t, &fakeSource{}, Metrics{Dropped: newDropped()})
	const n, messages = 4*fanOutSplit + 3, 20
	subs := make([]*Subscriber, n)
	for i := range subs {
		format := sse.FormatRaw
		if i%3 == 0 {
			format = sse.FormatEnvelope
		}
		subs[i] = NewSubscriber([]string{"big"}, format, messages+1, i%2 == 0)
		attach(t, r, subs[i])
	}
	for seq := uint64(1); seq <= messages; seq++ {
		r.Deliver(Message{Channel: "big", Payload: []byte(`{"data":"m` + strconv.FormatUint(seq, 10) + `"}`), Seq: seq})
	}
	r.Deliver(Message{Channel: "big", Payload: []byte(`{"data":"bye","close":true}`)})

	kinds := make([]map[*Frame]bool, messages)
	for i := range kinds {
		kinds[i] = make(map[*Frame]bool)
	}
	for i, s := range subs {
		frames, why := take(s)
		// The close is a frame of its own; a raw stream gets it as data.
		if len(frames) != messages+1 {
			t.Fatalf("subscriber %d: %d frames, want %d", i, len(frames), messages+1)
		}
		for j, f := range frames[:messages] {
			if f.Seq != uint64(j+1) {
				t.Fatalf("subscriber %d: frame %d has seq %d, want %d (order)", i, j, f.Seq, j+1)
			}
			kinds[j][f] = true
		}
		if s.format == sse.FormatEnvelope && (why != ReasonClosed || !frames[messages].Close) {
			t.Errorf("envelope subscriber %d: reason %q, last frame close %v; want closed", i, why, frames[messages].Close)
		}
		if s.format == sse.FormatRaw && (why != "" || frames[messages].Close) {
			t.Errorf("raw subscriber %d: reason %q, last frame close %v; want open", i, why, frames[messages].Close)
		}
	}
	for j, k := range kinds {
		// Raw and envelope; a resumable message has one id for streams
		// with and without history.
		if len(k) != 2 {
			t.Errorf("message %d was encoded into %d frames, want 2 (one per format)", j+1, len(k))
		}
	}
	if st := r.Snapshot(); st.Subscribers["big"] != n-(n+2)/3 {
		t.Errorf("subscribers after the close: %d, want the %d raw ones", st.Subscribers["big"], n-(n+2)/3)
	}
}

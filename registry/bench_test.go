package registry

import (
	"context"
	"io"
	"strconv"
	"testing"

	"github.com/caddy-sse/caddy-sse/sse"
)

// benchPayload is a typical small JSON event.
var benchPayload = []byte(`{"type":"notification","user":42,"text":"You have a new message","ts":1732384000}`)

// nopSource confirms every subscription at once and records nothing.
type nopSource struct{}

func (nopSource) Subscribe(context.Context, ...string) error { return nil }
func (nopSource) Unsubscribe(...string)                      {}
func (nopSource) Replay(context.Context, []string, uint64) ([]Message, bool, error) {
	return nil, false, nil
}
func (nopSource) ReplayPage(context.Context, []string, uint64, int64) (Page, error) {
	return Page{}, nil
}

// BenchmarkFanOut10k delivers one message to 10,000 subscribers of one
// channel. Only Deliver is timed: the queues are drained, timer stopped,
// before they fill. ns/frame is the time per subscriber reached; allocs/op
// must not depend on the number of subscribers (compare with
// BenchmarkFanOut1k).
func BenchmarkFanOut10k(b *testing.B) { benchFanOut(b, 10_000) }

// BenchmarkFanOut1k is BenchmarkFanOut10k with 1,000 subscribers.
func BenchmarkFanOut1k(b *testing.B) { benchFanOut(b, 1_000) }

func benchFanOut(b *testing.B, n int) {
	const buffer = 64
	r := newRegistry(b, nopSource{}, Metrics{Dropped: newDropped()})
	subs := make([]*Subscriber, n)
	bufs := make([][]*Frame, n)
	for i := range subs {
		subs[i] = NewSubscriber([]string{"room"}, sse.FormatRaw, buffer, false)
		attach(b, r, subs[i])
		subs[i].Take(make([]*Frame, 0, buffer))
		bufs[i] = make([]*Frame, 0, buffer)
	}
	drain := func() {
		for i, s := range subs {
			frames, why := s.Take(bufs[i])
			if why != "" {
				b.Fatalf("subscriber %d ends: %s", i, why)
			}
			clear(frames)
			bufs[i] = frames
			<-s.Wake()
		}
	}
	m := Message{Channel: "room", Payload: benchPayload}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		if i > 0 && i%buffer == 0 {
			b.StopTimer()
			drain()
			b.StartTimer()
		}
		r.Deliver(m)
	}
	b.StopTimer()
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/frame")
}

// BenchmarkTakeAndWrite takes 64 queued frames and writes them to
// io.Discard one by one, as a stream does before its single flush. The
// queue is refilled in the loop with a copy of 64 pointers.
func BenchmarkTakeAndWrite(b *testing.B) {
	const n = 64
	r := newRegistry(b, nopSource{}, Metrics{})
	src := make([]*Frame, n)
	for i := range src {
		src[i] = r.Encode(sse.FormatRaw, true, Message{Channel: "a", Payload: benchPayload, Seq: uint64(i + 1)})
	}
	s := NewSubscriber([]string{"a"}, sse.FormatRaw, n, false)
	s.Take(make([]*Frame, 0, n))
	buf := make([]*Frame, 0, n)
	var w io.Writer = io.Discard
	b.ReportAllocs()
	b.SetBytes(int64(n * len(src[0].Bytes)))
	b.ResetTimer()
	for range b.N {
		s.mu.Lock()
		s.queue = append(s.queue, src...)
		s.mu.Unlock()

		frames, why := s.Take(buf)
		if len(frames) != n || why != "" {
			b.Fatalf("took %d frames, reason %q", len(frames), why)
		}
		for _, f := range frames {
			if _, err := w.Write(f.Bytes); err != nil {
				b.Fatal(err)
			}
		}
		clear(frames)
		buf = frames
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/n, "ns/frame")
}

// BenchmarkAttachDetach attaches and detaches one subscriber: to a channel
// that has other listeners (no Redis command; the cost grows with the
// listeners, as the list is copied on write), and to a new channel (one
// Subscribe and one Unsubscribe through the reconciler, with a source that
// answers at once).
func BenchmarkAttachDetach(b *testing.B) {
	for _, others := range []int{1, 1_000, 10_000} {
		b.Run("existing/listeners="+strconv.Itoa(others), func(b *testing.B) {
			r := newRegistry(b, nopSource{}, Metrics{})
			for range others {
				attach(b, r, NewSubscriber([]string{"room"}, sse.FormatRaw, 16, false))
			}
			ctx := context.Background()
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				s := NewSubscriber([]string{"room"}, sse.FormatRaw, 16, false)
				if err := r.Attach(ctx, s); err != nil {
					b.Fatal(err)
				}
				r.Detach(s)
			}
		})
	}
	b.Run("new-channel", func(b *testing.B) {
		r := newRegistry(b, nopSource{}, Metrics{})
		ctx := context.Background()
		b.ReportAllocs()
		b.ResetTimer()
		for i := range b.N {
			s := NewSubscriber([]string{"c" + strconv.Itoa(i)}, sse.FormatRaw, 16, false)
			if err := r.Attach(ctx, s); err != nil {
				b.Fatal(err)
			}
			r.Detach(s)
		}
	})
}

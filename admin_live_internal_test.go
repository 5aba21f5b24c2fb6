package caddysse

import (
	"testing"
	"time"
)

// The ring turns counters into rates per second and keeps the last
// liveSamples samples, oldest first; since filters by time.
func TestLiveRecorderRates(t *testing.T) {
	t0 := time.UnixMilli(1_700_000_000_000)
	l := &liveRecorder{prevT: t0}
	l.record(t0.Add(time.Second), liveCounters{streams: 2, received: 10, delivered: 30})
	l.record(t0.Add(3*time.Second), liveCounters{streams: 3, received: 20, delivered: 60, dropped: 4, closed: 2})
	l.record(t0.Add(3*time.Second), liveCounters{received: 1e9}) // no time passed: ignored
	got := l.series(0)
	want := []liveSample{
		{T: t0.Add(time.Second).UnixMilli(), Streams: 2, Received: 10, Delivered: 30},
		{T: t0.Add(3 * time.Second).UnixMilli(), Streams: 3, Received: 5, Delivered: 15, Dropped: 2, Closed: 1},
	}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("series = %+v, want %+v", got, want)
	}
	if s := l.series(want[0].T); len(s) != 1 || s[0] != want[1] {
		t.Fatalf("series since the first = %+v, want only the second", s)
	}

	for i := 4; i < 4+liveSamples+100; i++ {
		l.record(t0.Add(time.Duration(i)*time.Second), liveCounters{received: 20 + float64(i)})
	}
	all := l.series(0)
	if len(all) != liveSamples {
		t.Fatalf("%d samples kept, want %d", len(all), liveSamples)
	}
	for i := 1; i < len(all); i++ {
		if all[i].T-all[i-1].T != 1000 || all[i].Received != 1 {
			t.Fatalf("samples %d and %d: %+v, %+v: want one a second, oldest first, 1 event/s", i-1, i, all[i-1], all[i])
		}
	}
	if last := all[len(all)-1].T; last != t0.Add(time.Duration(3+liveSamples+100)*time.Second).UnixMilli() {
		t.Fatalf("newest sample at %d, want the last recorded", last)
	}
}

// Sampling runs from the first acquire to the last release, which waits
// for it to stop.
func TestLiveRecorderLifetime(t *testing.T) {
	l := &liveRecorder{}
	l.acquire()
	l.acquire() // a new config's admin endpoint, before the old one goes
	l.mu.Lock()
	done := l.done
	l.mu.Unlock()
	l.release()
	select {
	case <-done:
		t.Fatal("sampling stopped while an admin endpoint still uses it")
	default:
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(l.series(0)) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no sample within 5s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	l.release()
	select {
	case <-done:
	default:
		t.Fatal("the last release returned before sampling stopped")
	}
	n := len(l.series(0))
	time.Sleep(2 * liveInterval)
	if len(l.series(0)) != n {
		t.Fatal("samples taken after the last release")
	}
}

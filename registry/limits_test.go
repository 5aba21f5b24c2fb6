package registry

import (
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/caddy-sse/caddy-sse/sse"
)

func newLimitSub() *Subscriber {
	return NewSubscriber([]string{"c"}, sse.FormatRaw, 4, false)
}

// endReason reports why s was asked to end, "" if it was not.
func endReason(s *Subscriber) Reason {
	_, why := s.Take(nil)
	return why
}

func TestLimitsReject(t *testing.T) {
	l := NewLimits()
	var releases []func()
	for i := 0; i < 2; i++ {
		rel, ok := l.Admit("alice", 2, false, newLimitSub())
		if !ok {
			t.Fatalf("stream %d of 2 refused", i+1)
		}
		releases = append(releases, rel)
	}
	if _, ok := l.Admit("alice", 2, false, newLimitSub()); ok {
		t.Fatal("third stream of alice admitted with max 2")
	}
	// Another key is counted apart.
	relBob, ok := l.Admit("bob", 2, false, newLimitSub())
	if !ok {
		t.Fatal("bob refused because of alice")
	}
	// Closing one makes room for exactly one; releasing twice frees nothing
	// more.
	releases[0]()
	releases[0]()
	rel, ok := l.Admit("alice", 2, false, newLimitSub())
	if !ok {
		t.Fatal("refused after a stream of alice ended")
	}
	if _, ok := l.Admit("alice", 2, false, newLimitSub()); ok {
		t.Fatal("a double release freed two places")
	}
	rel()
	releases[1]()
	relBob()
	if n := l.Keys(); n != 0 {
		t.Fatalf("%d keys left after every stream ended", n)
	}
}

func TestLimitsEvictOldest(t *testing.T) {
	l := NewLimits()
	s1, s2, s3, s4 := newLimitSub(), newLimitSub(), newLimitSub(), newLimitSub()
	rel1, _ := l.Admit("carol", 2, true, s1)
	rel2, _ := l.Admit("carol", 2, true, s2)
	rel3, ok := l.Admit("carol", 2, true, s3)
	if !ok {
		t.Fatal("evict refused a stream")
	}
	if why := endReason(s1); why != ReasonEvicted {
		t.Fatalf("oldest stream: end reason %q, want %q", why, ReasonEvicted)
	}
	if endReason(s2) != "" || endReason(s3) != "" {
		t.Fatal("a stream other than the oldest was ended")
	}
	// The evicted stream ending later must not free the place of another.
	rel1()
	rel4, _ := l.Admit("carol", 2, true, s4)
	if why := endReason(s2); why != ReasonEvicted {
		t.Fatalf("second oldest: end reason %q after the fourth stream, want evicted", why)
	}
	if endReason(s3) != "" {
		t.Fatal("third stream ended: the evicted first stream's release freed a place")
	}
	rel2()
	rel3()
	rel4()
	if n := l.Keys(); n != 0 {
		t.Fatalf("%d keys left after every stream ended", n)
	}
}

// TestLimitsConcurrent admits and releases streams from many goroutines
// (run it with -race): the limit holds at every moment and no key is left
// behind.
func TestLimitsConcurrent(t *testing.T) {
	for _, evict := range []bool{false, true} {
		t.Run(fmt.Sprint("evict=", evict), func(t *testing.T) {
			const max, keys, workers, rounds = 3, 4, 32, 500
			l := NewLimits()
			var wg sync.WaitGroup
			for w := 0; w < workers; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; i < rounds; i++ {
						key := fmt.Sprint("user", rand.IntN(keys))
						rel, ok := l.Admit(key, max, evict, newLimitSub())
						if !ok {
							continue
						}
						if n := l.Count(key); n > max {
							t.Errorf("%d streams held for one key, max %d", n, max)
						}
						rel()
					}
				}()
			}
			wg.Wait()
			if n := l.Keys(); n != 0 {
				t.Fatalf("%d keys left after every stream ended", n)
			}
		})
	}
}

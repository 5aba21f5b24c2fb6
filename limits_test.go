package caddysse

import (
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-sse/caddy-sse/registry"
	"github.com/caddy-sse/caddy-sse/sse"
)

func limitHandler(key string, max int, policy string) *Handler {
	return &Handler{MaxConnectionsPer: &ConnectionLimit{Key: key, Max: max, Policy: policy}}
}

func userRepl(user string) *caddy.Replacer {
	repl := caddy.NewReplacer()
	if user != "" {
		repl.Set("http.auth.user.id", user)
	}
	return repl
}

func newSub() *registry.Subscriber {
	return registry.NewSubscriber([]string{"c"}, sse.FormatRaw, 4, false)
}

// ended reports whether s was asked to end, and why.
func ended(s *registry.Subscriber) string {
	_, why := s.Take(nil)
	return why
}

func perKeyLen() int {
	perKey.mu.Lock()
	defer perKey.mu.Unlock()
	return len(perKey.streams)
}

func TestAdmitPerReject(t *testing.T) {
	h := limitHandler("{http.auth.user.id}", 2, "")
	var releases []func()
	for i := 0; i < 2; i++ {
		rel, ok := h.admitPer(userRepl("alice"), newSub())
		if !ok {
			t.Fatalf("stream %d of 2 refused", i+1)
		}
		releases = append(releases, rel)
	}
	if _, ok := h.admitPer(userRepl("alice"), newSub()); ok {
		t.Fatal("third stream of alice admitted with max 2")
	}
	// Another key is counted apart.
	relBob, ok := h.admitPer(userRepl("bob"), newSub())
	if !ok {
		t.Fatal("bob refused because of alice")
	}
	// A key that expands empty is not limited.
	for i := 0; i < 5; i++ {
		rel, ok := h.admitPer(userRepl(""), newSub())
		if !ok {
			t.Fatal("anonymous stream limited")
		}
		rel()
	}
	// Closing one makes room for exactly one; releasing twice frees nothing
	// more.
	releases[0]()
	releases[0]()
	rel, ok := h.admitPer(userRepl("alice"), newSub())
	if !ok {
		t.Fatal("refused after a stream of alice ended")
	}
	if _, ok := h.admitPer(userRepl("alice"), newSub()); ok {
		t.Fatal("a double release freed two places")
	}
	rel()
	releases[1]()
	relBob()
	if n := perKeyLen(); n != 0 {
		t.Fatalf("%d keys left after every stream ended", n)
	}
}

func TestAdmitPerEvictOldest(t *testing.T) {
	h := limitHandler("{http.auth.user.id}", 2, policyEvictOldest)
	s1, s2, s3, s4 := newSub(), newSub(), newSub(), newSub()
	rel1, _ := h.admitPer(userRepl("carol"), s1)
	rel2, _ := h.admitPer(userRepl("carol"), s2)
	rel3, ok := h.admitPer(userRepl("carol"), s3)
	if !ok {
		t.Fatal("evict_oldest refused a stream")
	}
	if why := ended(s1); why != registry.ReasonEvicted {
		t.Fatalf("oldest stream: end reason %q, want %q", why, registry.ReasonEvicted)
	}
	if ended(s2) != "" || ended(s3) != "" {
		t.Fatal("a stream other than the oldest was ended")
	}
	// The evicted stream ending later must not free the place of another.
	rel1()
	rel4, _ := h.admitPer(userRepl("carol"), s4)
	if why := ended(s2); why != registry.ReasonEvicted {
		t.Fatalf("second oldest: end reason %q after the fourth stream, want evicted", why)
	}
	if ended(s3) != "" {
		t.Fatal("third stream ended: the evicted first stream's release freed a place")
	}
	rel2()
	rel3()
	rel4()
	if n := perKeyLen(); n != 0 {
		t.Fatalf("%d keys left after every stream ended", n)
	}
}

// TestAdmitPerTemplatesCountApart checks that two handlers with the same
// template share counts and handlers with different templates do not.
func TestAdmitPerTemplatesCountApart(t *testing.T) {
	byUser := limitHandler("{http.auth.user.id}", 1, "")
	byUser2 := limitHandler("{http.auth.user.id}", 1, "")
	byHost := limitHandler("x{http.auth.user.id}", 1, "")
	rel, _ := byUser.admitPer(userRepl("dave"), newSub())
	defer rel()
	if _, ok := byUser2.admitPer(userRepl("dave"), newSub()); ok {
		t.Fatal("a second handler with the same template did not count the first one's stream")
	}
	rel2, ok := byHost.admitPer(userRepl("dave"), newSub())
	if !ok {
		t.Fatal("a handler with another template counted the first one's stream")
	}
	rel2()
}

// TestAdmitPerConcurrent opens and closes streams from many goroutines (run
// it with -race): the limit holds at every moment and no key is left behind.
func TestAdmitPerConcurrent(t *testing.T) {
	for _, policy := range []string{policyReject, policyEvictOldest} {
		t.Run(policy, func(t *testing.T) {
			const max, keys, workers, rounds = 3, 4, 32, 500
			h := limitHandler("{http.auth.user.id}", max, policy)
			var wg sync.WaitGroup
			for w := 0; w < workers; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; i < rounds; i++ {
						k := rand.IntN(keys)
						s := newSub()
						rel, ok := h.admitPer(userRepl(fmt.Sprint("user", k)), s)
						if !ok {
							continue
						}
						if n := holders(h, fmt.Sprint("user", k)); n > max {
							t.Errorf("%d streams held for one key, max %d", n, max)
						}
						rel()
					}
				}()
			}
			wg.Wait()
			if n := perKeyLen(); n != 0 {
				t.Fatalf("%d keys left after every stream ended", n)
			}
		})
	}
}

// holders is the number of streams counted for a user key.
func holders(h *Handler, user string) int {
	perKey.mu.Lock()
	defer perKey.mu.Unlock()
	return len(perKey.streams[h.MaxConnectionsPer.Key+"\x00"+user])
}

func TestConnectionLimitValidate(t *testing.T) {
	for _, tt := range []struct {
		l    *ConnectionLimit
		want bool
	}{
		{nil, true},
		{&ConnectionLimit{Key: "{http.auth.user.id}", Max: 1}, true},
		{&ConnectionLimit{Key: "{http.auth.user.id}", Max: 3, Policy: "evict_oldest"}, true},
		{&ConnectionLimit{Key: "", Max: 3}, false},
		{&ConnectionLimit{Key: "{http.auth.user.id}", Max: 0}, false},
		{&ConnectionLimit{Key: "{http.auth.user.id}", Max: -1}, false},
		{&ConnectionLimit{Key: "{http.auth.user.id}", Max: 1, Policy: "drop"}, false},
	} {
		if err := tt.l.validate(); (err == nil) != tt.want {
			t.Errorf("validate(%+v) = %v", tt.l, err)
		}
	}
}

package caddysse

import (
	"testing"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-sse/caddy-sse/registry"
	"github.com/caddy-sse/caddy-sse/sse"
)

// The counting itself is registry.Limits' and tested there; these tests
// cover the key templates and policies of max_connections_per.

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
func ended(s *registry.Subscriber) registry.Reason {
	_, why := s.Take(nil)
	return why
}

func TestAdmitPer(t *testing.T) {
	freshProcess(t)
	h := limitHandler("{http.auth.user.id}", 1, "")
	rel, ok := h.admitPer(userRepl("alice"), newSub())
	if !ok {
		t.Fatal("first stream of alice refused")
	}
	if _, ok := h.admitPer(userRepl("alice"), newSub()); ok {
		t.Fatal("second stream of alice admitted with max 1")
	}
	// Another value is counted apart.
	relBob, ok := h.admitPer(userRepl("bob"), newSub())
	if !ok {
		t.Fatal("bob refused because of alice")
	}
	// A key that expands empty, or a request without a replacer, is not
	// limited.
	for i := 0; i < 3; i++ {
		for _, repl := range []*caddy.Replacer{userRepl(""), nil} {
			rel, ok := h.admitPer(repl, newSub())
			if !ok {
				t.Fatal("anonymous stream limited")
			}
			rel()
		}
	}
	if n := proc().limits.Keys(); n != 2 {
		t.Fatalf("%d keys counted, want alice and bob", n)
	}
	rel()
	relBob()
	if n := proc().limits.Keys(); n != 0 {
		t.Fatalf("%d keys left after every stream ended", n)
	}
}

func TestAdmitPerEvictOldest(t *testing.T) {
	freshProcess(t)
	h := limitHandler("{http.auth.user.id}", 1, policyEvictOldest)
	s1, s2 := newSub(), newSub()
	rel1, _ := h.admitPer(userRepl("carol"), s1)
	rel2, ok := h.admitPer(userRepl("carol"), s2)
	if !ok {
		t.Fatal("evict_oldest refused a stream")
	}
	if why := ended(s1); why != registry.ReasonEvicted {
		t.Fatalf("oldest stream: end reason %q, want %q", why, registry.ReasonEvicted)
	}
	if ended(s2) != "" {
		t.Fatal("the newest stream was ended")
	}
	rel1()
	rel2()
}

// TestAdmitPerTemplatesCountApart checks that two handlers with the same
// template share counts and handlers with different templates do not.
func TestAdmitPerTemplatesCountApart(t *testing.T) {
	freshProcess(t)
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

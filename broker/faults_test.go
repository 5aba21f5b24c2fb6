package broker

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-sse/caddy-sse/internal/redistest"
)

// A wrong or missing password is a fault the operator fixes: the warning
// must say what Redis answered, not only that the connection failed.
func TestWrongPasswordLogged(t *testing.T) {
	for _, tc := range []struct{ userinfo, want string }{
		{":wrong@", "WRONGPASS"},
		{"", "NOAUTH"},
	} {
		t.Run(tc.want, func(t *testing.T) {
			srv := redistest.Start(t)
			// Set after start: the helper's readiness check speaks without AUTH.
			if err := srv.Client().ConfigSet(ctxT(t), "requirepass", "right").Err(); err != nil {
				t.Fatal(err)
			}
			core, logs := observer.New(zap.DebugLevel)
			startBroker(t, Options{Redis: parsedURL(t, "redis://"+tc.userinfo+srv.Addr()), Logger: zap.New(core), HealthCheck: 200 * time.Millisecond}, newRecorder())
			eventually(t, "a warning", func() bool { return logs.FilterLevelExact(zap.WarnLevel).Len() > 0 })
			w := logs.FilterLevelExact(zap.WarnLevel).All()[0]
			if line := w.Message + " " + fmtFields(w); !strings.Contains(line, tc.want) {
				t.Fatalf("warning %q does not carry Redis's reason (%s)", line, tc.want)
			}
		})
	}
}

// The password changes while the broker is connected (rotated in Redis,
// not yet in Caddy): the reconnect attempts fail on AUTH, and that reason
// must reach a warning, not only the debug lines of each retry.
func TestPasswordRotatedLogged(t *testing.T) {
	srv := redistest.Start(t)
	ctx := ctxT(t)
	c := srv.Client()
	if err := c.ConfigSet(ctx, "requirepass", "old").Err(); err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zap.DebugLevel)
	rec := newRecorder()
	b := startBroker(t, Options{Redis: parsedURL(t, "redis://:old@"+srv.Addr()), Logger: zap.New(core), HealthCheck: 200 * time.Millisecond}, rec)
	if err := b.Subscribe(ctx, "x"); err != nil {
		t.Fatal(err)
	}
	// c authenticated with no password before requirepass: it stays in.
	if err := c.ConfigSet(ctx, "requirepass", "new").Err(); err != nil {
		t.Fatal(err)
	}
	if err := c.ClientKillByFilter(ctx, "TYPE", "pubsub").Err(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a warning carrying WRONGPASS", func() bool {
		for _, e := range logs.FilterLevelExact(zap.WarnLevel).All() {
			if strings.Contains(e.Message+" "+fmtFields(e), "WRONGPASS") {
				return true
			}
		}
		return false
	})
	// Once per outage, not once per attempt.
	eventually(t, "more failed attempts", func() bool {
		return logs.FilterMessage("redis reconnect attempt failed").Len() >= 3
	})
	if n := logs.FilterLevelExact(zap.WarnLevel).Len(); n != 2 {
		for _, e := range logs.All() {
			t.Logf("%s %s %v", e.Level, e.Message, e.ContextMap())
		}
		t.Fatalf("%d warnings, want 2 (connection lost, then refused)", n)
	}
}

// FUNCTION FLUSH (or a failover to a replica without the library) leaves
// Redis without sse_publish while the broker stays connected: backends that
// FCALL it directly must get it back without waiting for a reconnect or a
// publish through the broker.
func TestLibraryCheckReloads(t *testing.T) {
	srv := redistest.Start(t)
	core, logs := observer.New(zap.DebugLevel)
	b := startBroker(t, Options{Redis: parsedURL(t, srv.URL()), Logger: zap.New(core), HealthCheck: 200 * time.Millisecond,
		LibraryCheck: 200 * time.Millisecond}, newRecorder())
	ctx := ctxT(t)
	if err := b.EnsureHistory(ctx, keep); err != nil {
		t.Fatal(err)
	}
	c := srv.Client()
	for round := range 2 {
		if err := c.FunctionFlush(ctx).Err(); err != nil {
			t.Fatal(err)
		}
		if err := c.FCall(ctx, PublishFunction, []string{"x"}, "y").Err(); !isNoFunction(err) {
			t.Fatalf("FCALL right after FUNCTION FLUSH = %v, want %q", err, "Function not found")
		}
		eventually(t, "FCALL to work again", func() bool {
			return c.FCall(ctx, PublishFunction, []string{"x"}, "y").Err() == nil
		})
		// One warning per loss, not one per check.
		eventually(t, "the warning", func() bool {
			return logs.FilterMessageSnippet("function library").FilterLevelExact(zap.WarnLevel).Len() == round+1
		})
	}
	time.Sleep(600 * time.Millisecond) // a few more checks find it in place
	if n := logs.FilterMessageSnippet("function library").FilterLevelExact(zap.WarnLevel).Len(); n != 2 {
		t.Fatalf("%d warnings for two losses, want 2", n)
	}
}

// fmtFields is an entry's fields as text, to look for a reason in.
func fmtFields(e observer.LoggedEntry) string {
	return fmt.Sprint(e.ContextMap())
}

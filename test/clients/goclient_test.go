package clients

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/caddy-sse/caddy-sse/internal/caddyproc"
	"github.com/caddy-sse/caddy-sse/internal/sseclient"
)

// The same checks with a Go client (internal/sseclient, which parses as the
// WHATWG algorithm does), reconnecting as EventSource does: after the
// server's retry delay, with Last-Event-ID.
func TestGoClient(t *testing.T) {
	caddyproc.SkipShort(t)
	s := start(t)
	ctx := context.Background()

	t.Run("events", func(t *testing.T) {
		st, err := sseclient.Get(ctx, s.caddy.URL()+"/live/room3")
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		cases := []struct{ payload, typ, data, id, retry string }{
			{`{"event":"chat","id":"m-1","data":{"text":"hi"}}`, "chat", `{"text":"hi"}`, "m-1", "2000"},
			{`{"data":"two\nlines","retry":1500}`, "message", "two\nlines", "m-1", "1500"},
			{`{"event":"notice","id":"m-2","data":"  two leading spaces"}`, "notice", "  two leading spaces", "m-2", "1500"},
			{`not json`, "message", "not json", "m-2", "1500"},
		}
		for _, c := range cases {
			s.publish(t, "live:room3", c.payload)
			ev, err := st.Next(5 * time.Second)
			if err != nil {
				t.Fatalf("published %s: %v", c.payload, err)
			}
			if ev.Event != c.typ || ev.Data != c.data || ev.ID != c.id || ev.Retry != c.retry {
				t.Fatalf("published %s: got %+v", c.payload, ev)
			}
		}
		time.Sleep(500 * time.Millisecond)
		if st.Comments() < 2 {
			t.Fatalf("%d comments after 500ms of silence with keepalive 200ms", st.Comments())
		}
		if _, err := st.Next(10 * time.Millisecond); !errors.Is(err, sseclient.ErrTimeout) {
			t.Fatalf("keepalives became events: %v", err)
		}
		s.publish(t, "live:room3", `{"event":"notice","data":"bye","close":true}`)
		if ev, err := st.Next(5 * time.Second); err != nil || ev.Data != "bye" {
			t.Fatalf("got %+v, %v", ev, err)
		}
		select {
		case <-st.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("the stream did not end after close")
		}
		_, err = sseclient.Get(ctx, s.caddy.URL()+"/live/room3", "Last-Event-ID", st.LastEventID())
		var se *sseclient.StatusError
		if !errors.As(err, &se) || se.Code != http.StatusNoContent {
			t.Fatalf("reconnect after close: %v, want 204", err)
		}
	})

	t.Run("resume", func(t *testing.T) {
		ticks := publishTicksAfter(s, "resume:room5", 60)
		log := reconnectingClient(t, s.caddy.URL()+"/resume/room5", 60, ticks.started)
		checkResume(t, log, collectIDs(t, ticks.ids), "close")
		if t.Failed() {
			logLines(t, log)
		}
	})
}

type ticks struct {
	started chan struct{}
	ids     <-chan string
}

// publishTicksAfter publishes n ticks every 50ms once started is closed.
func publishTicksAfter(s *server, channel string, n int) ticks {
	started := make(chan struct{})
	ids := make(chan string, n+1)
	go func() {
		defer close(ids)
		select {
		case <-started:
		case <-time.After(30 * time.Second):
			ids <- "error: the client never opened its stream"
			return
		}
		for id := range publishTicks(s.rdb, channel, n, 50*time.Millisecond) {
			ids <- id
		}
	}()
	return ticks{started, ids}
}

// reconnectingClient reads url until it has tick n, reconnecting as
// EventSource does, and returns its log in the node scripts' format.
func reconnectingClient(t *testing.T, url string, n int, opened chan struct{}) []msg {
	t.Helper()
	now := func() int64 { return time.Now().UnixMilli() }
	retry := 3 * time.Second // EventSource's usual default
	lastID := ""
	var log []msg
	deadline := time.Now().Add(30 * time.Second)
	for !hasTick(log, n) {
		if time.Now().After(deadline) {
			t.Fatalf("no tick %d within 30s", n)
		}
		var header []string
		connect := msg{Kind: "connect", T: now()}
		if lastID != "" {
			header = []string{"Last-Event-ID", lastID}
			id := lastID
			connect.LastEventID = &id
		}
		log = append(log, connect)
		st, err := sseclient.Get(context.Background(), url, header...)
		if err != nil {
			t.Fatalf("connecting: %v", err)
		}
		if opened != nil {
			close(opened)
			opened = nil
		}
		log = append(log, msg{Kind: "open", T: now()})
		for time.Now().Before(deadline) {
			ev, err := st.Next(time.Until(deadline))
			if err != nil {
				break
			}
			lastID = ev.ID
			id := ev.ID
			log = append(log, msg{Kind: "event", T: now(), Type: ev.Event, Data: ev.Data, LastEventID: &id})
			if ev.Retry != "" {
				if ms, err := strconv.Atoi(ev.Retry); err == nil {
					retry = time.Duration(ms) * time.Millisecond
				}
			}
		}
		st.Close()
		log = append(log, msg{Kind: "close", T: now()})
		if hasTick(log, n) {
			break
		}
		time.Sleep(retry)
	}
	return log
}

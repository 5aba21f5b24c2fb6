// Package ssetest is the shared harness of the tests that drive a running
// server: open a stream, publish to Redis, expect events, wait for a
// condition, read a metric, make a plain HTTP request. Every helper fails
// the test with what it saw rather than hanging: streams open within 5s,
// events arrive within 5s, waits have a bound.
package ssetest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-sse/caddy-sse/internal/sseclient"
)

// Timeout bounds opening a stream and waiting for one event.
const Timeout = 5 * time.Second

// client makes the plain requests: one that does not end within a generous
// bound fails the test rather than hang it.
var client = &http.Client{Timeout: 30 * time.Second}

// Open opens a GET stream on url, closed at the end of the test. It fails
// the test if the stream does not open (a refusal included) within Timeout.
func Open(tb testing.TB, url string, header ...string) *sseclient.Stream {
	tb.Helper()
	s, err := TryOpen(url, Timeout, header...)
	if err != nil {
		tb.Fatalf("opening %s: %v", url, err)
	}
	tb.Cleanup(s.Close)
	return s
}

// TryOpen opens a GET stream on url, giving up when the response headers
// take more than within. The caller closes the stream.
func TryOpen(url string, within time.Duration, header ...string) (*sseclient.Stream, error) {
	ctx, cancel := context.WithCancel(context.Background())
	timer := time.AfterFunc(within, cancel)
	s, err := sseclient.Get(ctx, url, header...)
	if err != nil || !timer.Stop() {
		cancel()
		if err == nil {
			s.Close()
			err = context.DeadlineExceeded
		}
		return nil, err
	}
	go func() {
		<-s.Done()
		cancel()
	}()
	return s, nil
}

// Refused opens url and expects it refused with status; it returns the
// refusal (status, headers, body) for more checks.
func Refused(tb testing.TB, url string, status int, header ...string) *sseclient.StatusError {
	tb.Helper()
	s, err := TryOpen(url, Timeout, header...)
	if err == nil {
		s.Close()
		tb.Fatalf("%s: stream opened, want %d", url, status)
	}
	var se *sseclient.StatusError
	if !errors.As(err, &se) || se.Code != status {
		tb.Fatalf("%s: %v, want status %d", url, err, status)
	}
	return se
}

// Next returns the next event of s, failing the test after Timeout.
func Next(tb testing.TB, s *sseclient.Stream) sseclient.Event {
	tb.Helper()
	ev, err := s.Next(Timeout)
	if err != nil {
		tb.Fatalf("waiting for an event: %v (received so far: %q)", err, s.Raw())
	}
	return ev
}

// Expect takes the next events of s and fails the test unless their data
// are want, in order; it returns them.
func Expect(tb testing.TB, s *sseclient.Stream, want ...string) []sseclient.Event {
	tb.Helper()
	got := make([]sseclient.Event, 0, len(want))
	for _, w := range want {
		ev, err := s.Next(Timeout)
		if err != nil {
			tb.Fatalf("waiting for %q: %v (received so far: %q)", w, err, s.Raw())
		}
		if ev.Data != w {
			tb.Fatalf("got data %q (event %q, id %q), want %q", ev.Data, ev.Event, ev.ID, w)
		}
		got = append(got, ev)
	}
	return got
}

// NoEvent fails the test if s gets an event within d.
func NoEvent(tb testing.TB, s *sseclient.Stream, d time.Duration) {
	tb.Helper()
	if ev, err := s.Next(d); err == nil {
		tb.Fatalf("unexpected event %+v", ev)
	}
}

// Publish publishes payload on channel with a plain PUBLISH; it returns how
// many subscriptions received it.
func Publish(tb testing.TB, rdb redis.Cmdable, channel, payload string) int64 {
	tb.Helper()
	n, err := rdb.Publish(context.Background(), channel, payload).Result()
	if err != nil {
		tb.Fatalf("PUBLISH %s: %v", channel, err)
	}
	return n
}

// PublishResumable publishes payload with the module's history function
// (FCALL sse_publish) and returns the event id, as a client sees it.
func PublishResumable(tb testing.TB, rdb redis.Cmdable, channel, payload string) string {
	tb.Helper()
	v, err := rdb.FCall(context.Background(), "sse_publish", []string{channel}, payload).Result()
	if err != nil {
		tb.Fatalf("FCALL sse_publish %s: %v", channel, err)
	}
	return fmt.Sprint(v)
}

// Numsub is the number of subscriptions to channel (PUBSUB NUMSUB).
func Numsub(tb testing.TB, rdb redis.Cmdable, channel string) int64 {
	tb.Helper()
	m, err := rdb.PubSubNumSub(context.Background(), channel).Result()
	if err != nil {
		tb.Fatalf("PUBSUB NUMSUB %s: %v", channel, err)
	}
	return m[channel]
}

// WaitNumsub waits up to within for channel to have want subscriptions.
func WaitNumsub(tb testing.TB, rdb redis.Cmdable, channel string, want int64, within time.Duration) {
	tb.Helper()
	var got int64
	Wait(tb, within, fmt.Sprintf("PUBSUB NUMSUB %s = %d", channel, want), func() bool {
		got = Numsub(tb, rdb, channel)
		return got == want
	}, func() string { return fmt.Sprint("it is ", got) })
}

// Wait polls cond every 20ms until it holds, and fails the test after
// within, naming what it waited for and, if given, what detail says.
func Wait(tb testing.TB, within time.Duration, what string, cond func() bool, detail ...func() string) {
	tb.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			msg := fmt.Sprintf("timed out after %v waiting for %s", within, what)
			for _, d := range detail {
				msg += "; " + d()
			}
			tb.Fatal(msg)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Do makes a request with body (none if empty) and header (name, value
// pairs), and returns the status, headers and body of the answer, read to
// its end (so not a stream's: see Status).
func Do(tb testing.TB, method, url, body string, header ...string) (int, http.Header, string) {
	tb.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		tb.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Add(header[i], header[i+1])
	}
	resp, err := client.Do(req)
	if err != nil {
		tb.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatalf("%s %s: reading the body: %v", method, url, err)
	}
	return resp.StatusCode, resp.Header, string(b)
}

// Get is Do for a GET without a body; it returns the status and body.
func Get(tb testing.TB, url string, header ...string) (int, string) {
	tb.Helper()
	code, _, body := Do(tb, http.MethodGet, url, "", header...)
	return code, body
}

// Status is the status of a GET of url; the body is not read, so url may
// be a stream.
func Status(tb testing.TB, url string, header ...string) int {
	tb.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		tb.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Add(header[i], header[i+1])
	}
	resp, err := client.Do(req)
	if err != nil {
		tb.Fatalf("GET %s: %v", url, err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// Metrics returns the Prometheus text at url (an admin endpoint's /metrics).
func Metrics(tb testing.TB, url string) string {
	tb.Helper()
	_, body := Get(tb, url)
	return body
}

// Metric returns the value of the series name (with its labels, as in the
// text format, such as `caddy_sse_streams_closed_total{reason="client"}`)
// at url, or -1 when there is no such series.
func Metric(tb testing.TB, url, name string) float64 {
	tb.Helper()
	for _, l := range strings.Split(Metrics(tb, url), "\n") {
		if v, ok := strings.CutPrefix(l, name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				tb.Fatalf("metric %s: %v", l, err)
			}
			return f
		}
	}
	return -1
}

// WaitMetric waits up to within for the series name at url to satisfy ok,
// and returns its value then.
func WaitMetric(tb testing.TB, url, name string, within time.Duration, ok func(float64) bool) float64 {
	tb.Helper()
	var v float64
	Wait(tb, within, name, func() bool {
		v = Metric(tb, url, name)
		return ok(v)
	}, func() string { return fmt.Sprintf("it is %v; metrics:\n%s", v, Lines(Metrics(tb, url), "caddy_sse_")) })
	return v
}

// Is is the ok of WaitMetric for one value.
func Is(want float64) func(float64) bool { return func(v float64) bool { return v == want } }

// WaitMetricLines waits up to within until the Prometheus text at url holds
// every one of lines, whole.
func WaitMetricLines(tb testing.TB, url string, within time.Duration, lines ...string) {
	tb.Helper()
	var body, missing string
	Wait(tb, within, "metrics", func() bool {
		body, missing = Metrics(tb, url), ""
		for _, want := range lines {
			if !strings.Contains(body, want+"\n") {
				missing = want
				return false
			}
		}
		return true
	}, func() string { return fmt.Sprintf("they lack %q:\n%s", missing, Lines(body, "caddy_sse_")) })
}

// Lines returns the lines of s that contain substr.
func Lines(s, substr string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

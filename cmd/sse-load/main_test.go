package main

import (
	"bufio"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

func TestHistogramPercentiles(t *testing.T) {
	var h histogram
	for v := uint64(1); v <= 100000; v++ {
		h.Record(v)
	}
	for _, c := range []struct {
		p    float64
		want uint64
	}{{50, 50000}, {90, 90000}, {99, 99000}, {100, 100000}} {
		got := h.Percentile(c.p)
		if d := float64(got) - float64(c.want); d < -0.01*float64(c.want) || d > 0.01*float64(c.want) {
			t.Errorf("p%v = %d, want %d within 1%%", c.p, got, c.want)
		}
	}
	if h.Max() != 100000 || h.Count() != 100000 {
		t.Errorf("max %d count %d", h.Max(), h.Count())
	}
	if m := h.Mean(); m != 50000.5 {
		t.Errorf("mean %v", m)
	}
}

func TestHistogramSmallExact(t *testing.T) {
	var h histogram
	if h.Percentile(50) != 0 {
		t.Fatal("empty histogram")
	}
	for _, v := range []uint64{3, 1, 2, 7, 5} {
		h.Record(v)
	}
	if got := h.Percentile(50); got != 3 {
		t.Errorf("p50 = %d, want 3", got)
	}
	if got := h.Percentile(99); got != 7 {
		t.Errorf("p99 = %d, want 7", got)
	}
}

func TestHistogramBuckets(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for range 100000 {
		v := r.Uint64() >> r.IntN(64)
		i := bucketOf(v)
		lo, hi := bucketRange(i)
		if v < lo || v > hi {
			t.Fatalf("%d in bucket %d = [%d, %d]", v, i, lo, hi)
		}
		if i >= histBuckets {
			t.Fatalf("bucket %d out of range", i)
		}
		if lo >= histSub && float64(hi-lo+1)/float64(lo) > 1.0/histSub+1e-12 {
			t.Fatalf("bucket %d too wide: [%d, %d]", i, lo, hi)
		}
	}
}

func TestMedian(t *testing.T) {
	if m := median([]float64{3, 1, 2}); m != 2 {
		t.Errorf("odd: %v", m)
	}
	if m := median([]float64{4, 1, 3, 2}); m != 2.5 {
		t.Errorf("even: %v", m)
	}
	if m := median(nil); m != 0 {
		t.Errorf("empty: %v", m)
	}
}

// collect runs an event stream through the dechunker and parser, fed in
// pieces of n bytes, and returns the send times of the events.
func collect(body string, chunked bool, n int) []int64 {
	var got []int64
	d := dechunker{chunked: chunked}
	p := eventParser{onEvent: func(sent int64) { got = append(got, sent) }}
	for len(body) > 0 {
		k := min(n, len(body))
		d.feed([]byte(body[:k]), p.feed)
		body = body[k:]
	}
	return got
}

func chunk(s string) string {
	return strings.ToUpper(strings.TrimLeft(hex(len(s)), "0")) + "\r\n" + s + "\r\n"
}

func hex(n int) string {
	const digits = "0123456789abcdef"
	var b []byte
	for ; n > 0; n >>= 4 {
		b = append([]byte{digits[n&15]}, b...)
	}
	return "0" + string(b)
}

func TestEventParsing(t *testing.T) {
	// Caddy-sse and Nchan framings, comments, a CR-only and a CRLF
	// stream, multi-line data, a data line longer than the line buffer.
	long := "t=42 " + strings.Repeat("y", 300)
	body := ":\n" +
		"data: t=1 xxx\n\n" +
		": hi\n\n" +
		"id: 1700000000:0\ndata: t=2\n\n" +
		"event: x\r\ndata: t=3\r\ndata: t=999\r\n\r\n" +
		"data:t=4\r\rdata: " + long + "\n\n" +
		"data: hello\n\n" +
		"data: t=5"
	want := []int64{1, 2, 3, 4, 42, -1}
	for _, n := range []int{1, 2, 3, 7, 1000} {
		if got := collect(body, false, n); !slices.Equal(got, want) {
			t.Errorf("identity, pieces of %d: %v, want %v", n, got, want)
		}
		// The same body, chunked at odd places.
		var cb string
		for i := 0; i < len(body); i += 11 {
			cb += chunk(body[i:min(i+11, len(body))])
		}
		cb += "0\r\n\r\n"
		if got := collect(cb, true, n); !slices.Equal(got, want) {
			t.Errorf("chunked, pieces of %d: %v, want %v", n, got, want)
		}
	}
}

func TestDechunkerExtensionsAndEnd(t *testing.T) {
	var out []byte
	d := dechunker{chunked: true}
	d.feed([]byte("5;ext=1\r\nhello\r\n0\r\n\r\nignored"), func(b []byte) { out = append(out, b...) })
	if string(out) != "hello" || !d.done || d.bad {
		t.Errorf("out %q done %v bad %v", out, d.done, d.bad)
	}
	d = dechunker{chunked: true}
	d.feed([]byte("zz\r\n"), func([]byte) {})
	if !d.bad {
		t.Error("bad size accepted")
	}
}

func TestPayloadRoundTrip(t *testing.T) {
	for _, size := range []int{0, 10, 64, 200} {
		p := appendPayload(nil, 123456789012, size)
		if size > 14 && len(p) != size {
			t.Errorf("size %d: got %d bytes", size, len(p))
		}
		if got := parseSent(p); got != 123456789012 {
			t.Errorf("size %d: parsed %d", size, got)
		}
	}
	for _, bad := range []string{"", "t=", "x=1", "t=abc", "t=1234567890123456789"} {
		if got := parseSent([]byte(bad)); got != -1 {
			t.Errorf("%q parsed as %d", bad, got)
		}
	}
}

func TestReadHead(t *testing.T) {
	resp := "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Long: " +
		strings.Repeat("a", 2000) + "\r\ntransfer-encoding: Chunked\r\n\r\n3\r\n:\n\n"
	br := bufio.NewReaderSize(strings.NewReader(resp), 64)
	h, err := readHead(br)
	if err != nil || h.status != 200 || !h.chunked {
		t.Fatalf("head %+v, err %v", h, err)
	}
	if rest, _ := br.Peek(br.Buffered()); !strings.HasPrefix("3\r\n:\n\n", string(rest)) {
		t.Errorf("body starts %q", rest)
	}

	br = bufio.NewReaderSize(strings.NewReader("HTTP/1.1 403 Forbidden\r\nContent-Length: 3\r\n\r\nno\n"), 64)
	if _, err := readHead(br); err == nil || err.Error() != "status 403" {
		t.Errorf("403: %v", err)
	}
	br = bufio.NewReaderSize(strings.NewReader("SSH-2.0\r\n\r\n"), 64)
	if _, err := readHead(br); err == nil {
		t.Error("garbage accepted")
	}
}

func TestParseStat(t *testing.T) {
	stat := "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 130 0 0 20 0 3 0 100 1000000 500 18446744073709551615\n"
	cpu, err := parseStatCPU([]byte(stat))
	if err != nil || cpu != 3.8 {
		t.Errorf("cpu %v err %v", cpu, err)
	}
	rss, err := parseStatusRSS([]byte("Name:\tx\nVmHWM:\t 9999 kB\nVmRSS:\t   12345 kB\nThreads: 3\n"))
	if err != nil || rss != 12345 {
		t.Errorf("rss %v err %v", rss, err)
	}
	if _, err := parseStatusRSS([]byte("Name: x\n")); err == nil {
		t.Error("no VmRSS accepted")
	}
}

func TestParseSourcesAndTarget(t *testing.T) {
	ips, err := parseSources("127.0.0.2-127.0.0.4,127.0.0.9")
	if err != nil || len(ips) != 4 || ips[2].String() != "127.0.0.4" || ips[3].String() != "127.0.0.9" {
		t.Errorf("ips %v err %v", ips, err)
	}
	for _, bad := range []string{"10.0.0.1", "127.0.0.5-127.0.0.2", "127.0.0.1-127.0.1.2", "x"} {
		if _, err := parseSources(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	tg, err := parseTarget("http://127.0.0.1:8080/sub/{ch}?x=1")
	if err != nil || tg.addr != "127.0.0.1:8080" || string(tg.request("a b")) !=
		"GET /sub/a%20b?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n" {
		t.Errorf("target %+v err %v: %q", tg, err, tg.request("a b"))
	}
	if _, err := parseTarget("http://127.0.0.1/sub/x"); err == nil {
		t.Error("template without {ch} accepted")
	}
}

func TestTargetHTTPSAndProto(t *testing.T) {
	tg, err := parseTarget("https://127.0.0.1/sub/{ch}")
	if err != nil || tg.addr != "127.0.0.1:443" || tg.scheme != "https" || tg.url("a b") != "https://127.0.0.1/sub/a%20b" {
		t.Fatalf("target %+v err %v", tg, err)
	}
	for _, c := range []struct {
		url, proto, want string
	}{
		{"http://127.0.0.1:1/{ch}", "", protoH1},
		{"https://127.0.0.1:1/{ch}", "", protoH2},
		{"https://127.0.0.1:1/{ch}", "h1", protoH1},
		{"https://127.0.0.1:1/{ch}", "h2", protoH2},
		{"http://127.0.0.1:1/{ch}", "h2", ""},
		{"https://127.0.0.1:1/{ch}", "h3", ""},
	} {
		tg, err := parseTarget(c.url)
		if err != nil {
			t.Fatal(err)
		}
		got, err := checkProto(c.proto, tg)
		if got != c.want || (err == nil) != (c.want != "") {
			t.Errorf("%s -proto %q: %q, %v; want %q", c.url, c.proto, got, err, c.want)
		}
	}
	if _, err := parseTarget("ftp://127.0.0.1/{ch}"); err == nil {
		t.Error("ftp:// accepted")
	}
}

// The summary: ratio tables per baseline, the HTTPS + HTTP/2 table with
// ratios to Go's floor and to Nchan, and the targets.
func TestSummaryBaselines(t *testing.T) {
	var reps []*report
	add := func(name, label, mode, proto string, cpu, scpu, p99, rss float64) {
		for run := 1; run <= 3; run++ {
			// The medians are the values of run 2.
			k := 1 + 0.1*float64(run-2)
			reps = append(reps, &report{Name: name, Label: label, Mode: mode, Proto: proto, Run: run,
				Streams: 10, Connected: 10, Expected: 100, Delivered: 100,
				CPUTotalUs: cpu * k, CPUServerUs: scpu * k, LatP99: p99 * k, RSSPerStream: rss * k})
		}
	}
	add("fanout", "caddy-sse", "fanout", "h1", 10, 10, 100, 9)
	add("fanout", "nchan", "fanout", "h1", 12, 12, 1000, 10)
	add("fanout", "floor", "fanout", "h1", 8, 8, 50, 3)
	add("idle", "caddy-sse", "idle", "h1", 0, 0, 0, 6)
	add("idle", "caddy-sse/log", "idle", "h1", 0, 0, 0, 16)
	add("idle", "floor", "idle", "h1", 0, 0, 0, 4)
	add("h2-fanout", "caddy-sse", "fanout", "h2", 40, 36, 20, 80)
	add("h2-fanout", "go-floor", "fanout", "h2", 24, 24, 20, 60)
	add("h2-fanout", "nchan", "fanout", "h2", 20, 18, 20, 50)
	add("h2-idle", "caddy-sse", "idle", "h2", 0, 0, 0, 69)
	add("h2-idle", "go-floor", "idle", "h2", 0, 0, 0, 60)
	var b strings.Builder
	writeMarkdown(&b, groupReports(reps), []string{"nchan", "floor", "go-floor"})
	md := b.String()
	for _, want := range []string{
		"Ratios of medians to nchan",
		"Ratios of medians to floor",
		"| fanout | caddy-sse | 1.25x | 1.25x | 2.00x | 3.00x |  |",
		"| idle | caddy-sse/log |  |  |  | 4.00x |  |",
		"| scenario | server | runs | streams | delivered / expected | p99 ms | server CPU us / event | vs go-floor | vs nchan | RSS KiB / stream | vs go-floor | vs nchan |",
		"| h2-fanout | caddy-sse | 3 | 10 / 10 | 100 / 100 | 20.00 | 36.0 | 1.50x | 2.00x | 80.0 | 1.33x | 1.60x |",
		"| h2-idle | caddy-sse | 3 | 10 / 10 |  |  |  |  |  | 69.0 | 1.15x |  |",
		"| caddy-sse | fan-out CPU per delivered event (server + Redis) <= 1.10x floor | 1.25x | **no** |",
		"| caddy-sse | fan-out p99 latency <= 0.7x Nchan | 0.10x | yes |",
		"| caddy-sse/log | idle RSS per open stream <= 2.0x floor | 4.00x | **no** |",
		"| caddy-sse | HTTPS + HTTP/2: idle RSS per stream <= 1.15x Go's floor | 1.15x | yes |",
		"| caddy-sse | HTTPS + HTTP/2: fan-out server CPU per delivered event <= 1.15x Go's floor | 1.50x | **no** |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("summary lacks %q", want)
		}
	}
	if !strings.Contains(md, "Ratios of medians to go-floor") {
		t.Error("no ratios to go-floor")
	}
	if t.Failed() {
		t.Log(md)
	}
}

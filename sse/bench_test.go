package sse

import (
	"strings"
	"testing"
)

// BenchmarkAppendEvent is the common case: one line of JSON with an id and
// an event type, into a reused buffer.
func BenchmarkAppendEvent(b *testing.B) {
	ev := Event{ID: "1712345678901-0", Event: "update", Data: []byte(`{"user":42,"text":"hello, world","unread":3}`)}
	buf := make([]byte, 0, 4096)
	b.ReportAllocs()
	b.SetBytes(int64(len(ev.Data)))
	for b.Loop() {
		buf, _ = AppendEvent(buf[:0], &ev)
	}
}

// BenchmarkAppendEventMultiline is a 4 KiB payload of 64 lines with mixed
// line breaks.
func BenchmarkAppendEventMultiline(b *testing.B) {
	var sb strings.Builder
	breaks := []string{"\n", "\r\n", "\r"}
	for i := range 64 {
		sb.WriteString(strings.Repeat("x", 60))
		sb.WriteString(breaks[i%3])
	}
	ev := Event{ID: "7", Data: []byte(sb.String())}
	buf := make([]byte, 0, 8192)
	b.ReportAllocs()
	b.SetBytes(int64(len(ev.Data)))
	for b.Loop() {
		buf, _ = AppendEvent(buf[:0], &ev)
	}
}

// BenchmarkAppendEventRepair is the slow path: invalid UTF-8 and an unsafe
// id.
func BenchmarkAppendEventRepair(b *testing.B) {
	ev := Event{ID: "1\n2", Data: []byte("caf\xe9 au lait\nna\xefve")}
	buf := make([]byte, 0, 4096)
	b.ReportAllocs()
	for b.Loop() {
		buf, _ = AppendEvent(buf[:0], &ev)
	}
}

// BenchmarkDecodeEnvelope decodes a typical envelope with object data.
func BenchmarkDecodeEnvelope(b *testing.B) {
	p := []byte(`{"event":"update","id":"42","data":{"user": 42, "text": "hello, world", "unread": 3},"retry":5000}`)
	b.ReportAllocs()
	b.SetBytes(int64(len(p)))
	for b.Loop() {
		Decode(FormatEnvelope, p)
	}
}

// BenchmarkDecodeEnvelopeString decodes an envelope whose data is a string
// with escapes.
func BenchmarkDecodeEnvelopeString(b *testing.B) {
	p := []byte(`{"event":"chat","data":"line one\nline \"two\"\n\u00e9t\u00e9"}`)
	b.ReportAllocs()
	b.SetBytes(int64(len(p)))
	for b.Loop() {
		Decode(FormatEnvelope, p)
	}
}

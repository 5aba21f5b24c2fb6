package sse

import (
	"strings"
	"testing"
	"unicode/utf8"
)

// This file holds a reference client: the WHATWG UTF-8 decoder (Encoding
// Standard) and the event stream interpretation of the WHATWG HTML standard,
// "Server-sent events", written step by step from the text rather than for
// speed, so the encoder can be checked against what a browser does.

// field is one field line as the parser processed it.
type field struct {
	Name, Value string
}

// parsedEvent is one dispatched event.
type parsedEvent struct {
	Type        string // "message" when no event field was given
	Data        string
	LastEventID string
	// Fields lists every field line processed since the previous dispatch
	// (or the stream start), in order, known or not.
	Fields []field
}

// parsedStream is everything a client learns from a stream.
type parsedStream struct {
	Events    []parsedEvent
	Retry     int64 // reconnection time, when HasRetry
	HasRetry  bool
	Comments  int
	Unknown   []field // fields other than event, data, id, retry
	Leftover  []field // fields after the last dispatch, never dispatched
	Remainder string  // an unterminated last line, discarded at end of stream
}

// whatwgDecodeUTF8 is the Encoding Standard's "UTF-8 decode" with
// replacement error mode.
func whatwgDecodeUTF8(b []byte) string {
	var out strings.Builder
	var codePoint rune
	bytesNeeded, bytesSeen := 0, 0
	lower, upper := byte(0x80), byte(0xBF)
	for i := 0; ; i++ {
		if i == len(b) { // end-of-queue
			if bytesNeeded != 0 {
				out.WriteRune(utf8.RuneError)
			}
			return out.String()
		}
		c := b[i]
		if bytesNeeded == 0 {
			switch {
			case c <= 0x7F:
				out.WriteByte(c)
			case c >= 0xC2 && c <= 0xDF:
				bytesNeeded = 1
				codePoint = rune(c & 0x1F)
			case c >= 0xE0 && c <= 0xEF:
				if c == 0xE0 {
					lower = 0xA0
				}
				if c == 0xED {
					upper = 0x9F
				}
				bytesNeeded = 2
				codePoint = rune(c & 0xF)
			case c >= 0xF0 && c <= 0xF4:
				if c == 0xF0 {
					lower = 0x90
				}
				if c == 0xF4 {
					upper = 0x8F
				}
				bytesNeeded = 3
				codePoint = rune(c & 0x7)
			default:
				out.WriteRune(utf8.RuneError)
			}
			continue
		}
		if c < lower || c > upper {
			codePoint, bytesNeeded, bytesSeen = 0, 0, 0
			lower, upper = 0x80, 0xBF
			i-- // restore byte to the queue
			out.WriteRune(utf8.RuneError)
			continue
		}
		lower, upper = 0x80, 0xBF
		codePoint = codePoint<<6 | rune(c&0x3F)
		bytesSeen++
		if bytesSeen == bytesNeeded {
			out.WriteRune(codePoint)
			codePoint, bytesNeeded, bytesSeen = 0, 0, 0
		}
	}
}

// parseStream interprets b as a whole event stream.
func parseStream(b []byte) parsedStream {
	var st parsedStream
	s := whatwgDecodeUTF8(b)
	s = strings.TrimPrefix(s, "\uFEFF") // one leading BOM is skipped

	var dataBuf strings.Builder // appended to per data line: no quadratic copying
	var typeBuf, lastIDBuf string
	var fields []field
	dispatch := func() {
		lastID := lastIDBuf
		data := dataBuf.String()
		dataBuf.Reset()
		if data == "" {
			typeBuf = ""
			fields = nil
			return
		}
		data = strings.TrimSuffix(data, "\n")
		typ := typeBuf
		if typ == "" {
			typ = "message"
		}
		st.Events = append(st.Events, parsedEvent{Type: typ, Data: data, LastEventID: lastID, Fields: fields})
		typeBuf = ""
		fields = nil
	}
	process := func(name, value string) {
		fields = append(fields, field{name, value})
		switch name {
		case "event":
			typeBuf = value
		case "data":
			dataBuf.WriteString(value)
			dataBuf.WriteByte('\n')
		case "id":
			if !strings.ContainsRune(value, 0) {
				lastIDBuf = value
			}
		case "retry":
			if value != "" && strings.Trim(value, "0123456789") == "" {
				var n int64
				for _, c := range value {
					n = n*10 + int64(c-'0')
				}
				st.Retry, st.HasRetry = n, true
			}
		default:
			st.Unknown = append(st.Unknown, field{name, value})
		}
	}

	for {
		// A line ends at CRLF, LF or CR.
		end := strings.IndexAny(s, "\r\n")
		if end < 0 {
			st.Remainder = s
			break
		}
		line := s[:end]
		next := end + 1
		if s[end] == '\r' && next < len(s) && s[next] == '\n' {
			next++
		}
		s = s[next:]

		switch {
		case line == "":
			dispatch()
		case line[0] == ':':
			st.Comments++
		default:
			name, value, found := strings.Cut(line, ":")
			if found {
				value = strings.TrimPrefix(value, " ")
			}
			process(name, value)
		}
	}
	st.Leftover = fields
	return st
}

func TestWhatwgDecodeUTF8(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", ""},
		{"abc", "abc"},
		{"é€😀", "é€😀"},
		{"\xff", "\uFFFD"},
		{"\xe2\x82", "\uFFFD"},                 // truncated: one maximal subpart
		{"\xe2\x82x", "\uFFFDx"},               // x is reprocessed
		{"\xe0\x80\x80", "\uFFFD\uFFFD\uFFFD"}, // overlong: E0 then 80 80
		{"\xed\xa0\x80", "\uFFFD\uFFFD\uFFFD"}, // surrogate
		{"\xf4\x90\x80\x80", "\uFFFD\uFFFD\uFFFD\uFFFD"},
		{"\xf0\x9f\x98", "\uFFFD"},
		{"\xc0\xaf", "\uFFFD\uFFFD"},
	} {
		if got := whatwgDecodeUTF8([]byte(tc.in)); got != tc.want {
			t.Errorf("whatwgDecodeUTF8(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestParseStream(t *testing.T) {
	st := parseStream([]byte("\uFEFF:hi\nretry: 10\nid: 1\nevent: e\ndata:a\ndata:  b\r\rdata\nid: x\x00\n\nfoo: 1\ndata: c\n\ndata: d"))
	want := []parsedEvent{
		{Type: "e", Data: "a\n b", LastEventID: "1"},
		{Type: "message", Data: "", LastEventID: "1"},
		{Type: "message", Data: "c", LastEventID: "1"},
	}
	if len(st.Events) != len(want) {
		t.Fatalf("events %+v, want %+v", st.Events, want)
	}
	for i, ev := range st.Events {
		if ev.Type != want[i].Type || ev.Data != want[i].Data || ev.LastEventID != want[i].LastEventID {
			t.Errorf("event %d = %+v, want %+v", i, ev, want[i])
		}
	}
	if !st.HasRetry || st.Retry != 10 || st.Comments != 1 || len(st.Unknown) != 1 || st.Remainder != "data: d" {
		t.Errorf("stream = %+v", st)
	}
	// A blank line with no data dispatches nothing.
	if st := parseStream([]byte("event: x\n\n")); len(st.Events) != 0 {
		t.Errorf("events %+v, want none", st.Events)
	}
}

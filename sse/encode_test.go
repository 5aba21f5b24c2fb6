package sse

import (
	"fmt"
	"strings"
	"testing"
	"unicode/utf8"
)

// normalizeLines turns CRLF and lone CR into LF, as a client splitting lines
// does.
func normalizeLines(s string) string {
	return strings.ReplaceAll(strings.ReplaceAll(s, "\r\n", "\n"), "\r", "\n")
}

// repairField is what a field value must read as on the client side.
func repairField(s string) string {
	return strings.Map(func(r rune) rune {
		if r == '\r' || r == '\n' || r == 0 {
			return utf8.RuneError
		}
		return r
	}, whatwgDecodeUTF8([]byte(s)))
}

// wantFault is the fault AppendEvent must report for ev.
func wantFault(ev *Event) Fault {
	var f Fault
	if strings.ContainsAny(ev.ID, "\r\n\x00") || strings.ContainsAny(ev.Event, "\r\n\x00") {
		f |= FaultUnsafeField
	}
	if !utf8.ValidString(ev.ID) || !utf8.ValidString(ev.Event) || !utf8.Valid(ev.Data) {
		f |= FaultInvalidUTF8
	}
	return f
}

// checkRoundTrip encodes ev after prefix, parses the result as a client does
// and reports every difference from what the client must see: exactly one
// event, with the data (line breaks made LF, invalid UTF-8 replaced), type and
// id of ev, made of exactly the expected fields and nothing else.
func checkRoundTrip(ev *Event) error {
	prefix := []byte("pre")
	frame, fault := AppendEvent(prefix, ev)
	if string(frame[:len(prefix)]) != "pre" {
		return fmt.Errorf("prefix overwritten: %q", frame)
	}
	frame = frame[len(prefix):]
	if want := wantFault(ev); fault != want {
		return fmt.Errorf("fault %v, want %v", fault, want)
	}
	if !utf8.Valid(frame) {
		return fmt.Errorf("frame is not valid UTF-8: %q", frame)
	}
	if strings.HasPrefix(string(frame), "\uFEFF") {
		return fmt.Errorf("frame starts with a BOM: %q", frame)
	}
	if !strings.HasSuffix(string(frame), "\n\n") {
		return fmt.Errorf("frame does not end with a blank line: %q", frame)
	}
	// Parse twice in a row: a frame must leave no state that changes the
	// next one (an unterminated line, a pending field).
	st := parseStream(append(append([]byte(nil), frame...), frame...))
	if len(st.Events) != 2 {
		return fmt.Errorf("frame %q: %d events, want 1 per frame", frame, len(st.Events)/2)
	}
	if len(st.Unknown) != 0 || len(st.Leftover) != 0 || st.Remainder != "" || st.Comments != 0 {
		return fmt.Errorf("frame %q: stray fields or lines: %+v", frame, st)
	}
	wantData := normalizeLines(whatwgDecodeUTF8(ev.Data))
	wantType := repairField(ev.Event)
	if wantType == "" {
		wantType = "message"
	}
	wantID := repairField(ev.ID)
	var wantFields []string
	if ev.ID != "" {
		wantFields = append(wantFields, "id")
	}
	if ev.Event != "" {
		wantFields = append(wantFields, "event")
	}
	wantRetry := ev.HasRetry && ev.Retry >= 0
	if wantRetry {
		wantFields = append(wantFields, "retry")
	}
	for range strings.Count(wantData, "\n") + 1 {
		wantFields = append(wantFields, "data")
	}
	for i, got := range st.Events {
		if got.Data != wantData {
			return fmt.Errorf("frame %q: data %q, want %q", frame, got.Data, wantData)
		}
		if got.Type != wantType {
			return fmt.Errorf("frame %q: type %q, want %q", frame, got.Type, wantType)
		}
		if got.LastEventID != wantID {
			return fmt.Errorf("frame %q: id %q, want %q", frame, got.LastEventID, wantID)
		}
		var names []string
		for _, f := range got.Fields {
			names = append(names, f.Name)
		}
		if strings.Join(names, ",") != strings.Join(wantFields, ",") {
			return fmt.Errorf("frame %q, event %d: fields %v, want %v", frame, i, names, wantFields)
		}
	}
	if st.HasRetry != wantRetry || (wantRetry && st.Retry != ev.Retry) {
		return fmt.Errorf("frame %q: retry %v %d, want %v %d", frame, st.HasRetry, st.Retry, wantRetry, ev.Retry)
	}
	return nil
}

func TestAppendEvent(t *testing.T) {
	for _, tc := range []struct {
		name  string
		ev    Event
		want  string
		fault Fault
	}{
		{"empty", Event{}, "data: \n\n", 0},
		{"simple", Event{Data: []byte("hello")}, "data: hello\n\n", 0},
		{"all fields", Event{ID: "7", Event: "msg", Retry: 1500, HasRetry: true, Data: []byte("x")},
			"id: 7\nevent: msg\nretry: 1500\ndata: x\n\n", 0},
		{"retry zero", Event{HasRetry: true}, "retry: 0\ndata: \n\n", 0},
		{"negative retry left out", Event{Retry: -1, HasRetry: true, Data: []byte("x")}, "data: x\n\n", 0},
		{"retry without HasRetry", Event{Retry: 5, Data: []byte("x")}, "data: x\n\n", 0},
		{"close is not on the wire", Event{Close: true, Data: []byte("bye")}, "data: bye\n\n", 0},
		{"lone CR cannot inject an id", Event{Data: []byte("x\rid: 9")}, "data: x\ndata: id: 9\n\n", 0},
		{"mixed line breaks", Event{Data: []byte("a\r\nb\nc\rd")}, "data: a\ndata: b\ndata: c\ndata: d\n\n", 0},
		{"CR LF pairs only once", Event{Data: []byte("a\n\rb\r\r\nc")}, "data: a\ndata: \ndata: b\ndata: \ndata: c\n\n", 0},
		{"leading space kept", Event{Data: []byte(" x")}, "data:  x\n\n", 0},
		{"leading colon", Event{Data: []byte(":x\n:y")}, "data: :x\ndata: :y\n\n", 0},
		{"only newlines", Event{Data: []byte("\n\n")}, "data: \ndata: \ndata: \n\n", 0},
		{"trailing newline", Event{Data: []byte("a\n")}, "data: a\ndata: \n\n", 0},
		{"trailing CR", Event{Data: []byte("a\r")}, "data: a\ndata: \n\n", 0},
		{"NUL in data is fine", Event{Data: []byte("a\x00b")}, "data: a\x00b\n\n", 0},
		{"BOM in data is data", Event{Data: []byte("\uFEFFx")}, "data: \uFEFFx\n\n", 0},
		{"NUL in id", Event{ID: "1\x002", Data: []byte("x")}, "id: 1\uFFFD2\ndata: x\n\n", FaultUnsafeField},
		{"LF in id", Event{ID: "1\ndata: y", Data: []byte("x")}, "id: 1\uFFFDdata: y\ndata: x\n\n", FaultUnsafeField},
		{"CR and LF in event", Event{Event: "a\r\nid: 3", Data: []byte("x")}, "event: a\uFFFD\uFFFDid: 3\ndata: x\n\n", FaultUnsafeField},
		{"NUL in event", Event{Event: "a\x00", Data: []byte("x")}, "event: a\uFFFD\ndata: x\n\n", FaultUnsafeField},
		{"spaces in fields kept", Event{ID: " 1 ", Event: " e"}, "id:  1 \nevent:  e\ndata: \n\n", 0},
		{"invalid UTF-8 in data", Event{Data: []byte("a\xffb\xe2\x82\nc\xed\xa0\x80")},
			"data: a\uFFFDb\uFFFD\ndata: c\uFFFD\uFFFD\uFFFD\n\n", FaultInvalidUTF8},
		{"invalid UTF-8 in id", Event{ID: "\xc3", Data: []byte("x")}, "id: \uFFFD\ndata: x\n\n", FaultInvalidUTF8},
		{"invalid UTF-8 and CR in event", Event{Event: "\xf0\x9f\x98\r", Data: []byte("x")},
			"event: \uFFFD\uFFFD\ndata: x\n\n", FaultInvalidUTF8 | FaultUnsafeField},
		{"valid UTF-8 kept", Event{ID: "é", Event: "€", Data: []byte("😀\n한")}, "id: é\nevent: €\ndata: 😀\ndata: 한\n\n", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, fault := AppendEvent(nil, &tc.ev)
			if string(got) != tc.want {
				t.Errorf("AppendEvent = %q, want %q", got, tc.want)
			}
			if fault != tc.fault {
				t.Errorf("fault = %v, want %v", fault, tc.fault)
			}
			if err := checkRoundTrip(&tc.ev); err != nil {
				t.Error(err)
			}
		})
	}
}

func TestAppendEventNoAlloc(t *testing.T) {
	for _, ev := range []Event{
		{ID: "1-0", Event: "update", Data: []byte(`{"text":"hello"}`)},
		{Data: []byte("line one\nline two\r\nline three\rfour")},
		{ID: "é", Event: "€", Retry: 3000, HasRetry: true, Data: []byte("😀")},
	} {
		buf := make([]byte, 0, 1024)
		allocs := testing.AllocsPerRun(100, func() {
			buf, _ = AppendEvent(buf[:0], &ev)
		})
		if allocs != 0 {
			t.Errorf("AppendEvent(%+v) allocates %v times", ev, allocs)
		}
	}
}

func TestAppendRetry(t *testing.T) {
	for _, tc := range []struct {
		ms   int64
		want string
	}{
		{0, "retry: 0\n"},
		{3000, "retry: 3000\n"},
		{1<<63 - 1, "retry: 9223372036854775807\n"},
		{-1, ""},
	} {
		if got := AppendRetry([]byte("x"), tc.ms); string(got) != "x"+tc.want {
			t.Errorf("AppendRetry(%d) = %q, want %q", tc.ms, got, "x"+tc.want)
		}
	}
	st := parseStream(append(AppendRetry(nil, 2500), Comment...))
	if !st.HasRetry || st.Retry != 2500 || len(st.Events) != 0 || len(st.Unknown) != 0 {
		t.Errorf("retry line parses as %+v", st)
	}
}

func TestComment(t *testing.T) {
	if string(Comment) != ":\n" {
		t.Fatalf("Comment = %q", Comment)
	}
	st := parseStream(append(append([]byte(nil), Comment...), Comment...))
	if st.Comments != 2 || len(st.Events) != 0 || len(st.Leftover) != 0 {
		t.Errorf("two comments parse as %+v", st)
	}
}

// TestSeqLen checks the repair of every one- and two-byte input and of the
// boundaries of longer ones against the reference decoder.
func TestSeqLen(t *testing.T) {
	check := func(b []byte) {
		t.Helper()
		got := string(appendValidUTF8(nil, b))
		if want := whatwgDecodeUTF8(b); got != want {
			t.Errorf("repair of %q = %q, want %q", b, got, want)
		}
	}
	for a := range 256 {
		check([]byte{byte(a)})
		for b := range 256 {
			check([]byte{byte(a), byte(b)})
		}
	}
	for _, lead := range []byte{0xE0, 0xE1, 0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5} {
		for _, c1 := range []byte{0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0} {
			for _, c2 := range []byte{0x41, 0x80, 0xBF, 0xC0} {
				check([]byte{lead, c1, c2})
				for _, c3 := range []byte{0x41, 0x80, 0xBF, 0xC0} {
					check([]byte{lead, c1, c2, c3})
				}
			}
		}
	}
}

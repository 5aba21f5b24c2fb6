package sse

import (
	"bytes"
	"encoding/json"
	"fmt"
	"testing"
	"unicode/utf8"
)

// oracleDecode is the envelope semantics written with encoding/json, for
// differential testing of the hand-written decoder: keys match exactly (a map
// keeps them as written; the last of a repeated key wins), null is absence
// but for data, and a type mismatch makes the payload a bad envelope.
// strData reports that data was a JSON string.
func oracleDecode(p []byte) (ev Event, strData, ok bool) {
	if t := bytes.TrimLeft(p, " \t\r\n"); len(t) == 0 || t[0] != '{' {
		return Event{}, false, false
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(p, &m); err != nil {
		return Event{}, false, false
	}
	for _, s := range []struct {
		key string
		dst any
	}{{"event", &ev.Event}, {"id", &ev.ID}, {"close", &ev.Close}} {
		if v, ok := m[s.key]; ok {
			if err := json.Unmarshal(v, s.dst); err != nil {
				return Event{}, false, false
			}
		}
	}
	if v, ok := m["retry"]; ok && string(v) != "null" {
		if err := json.Unmarshal(v, &ev.Retry); err != nil || ev.Retry < 0 {
			return Event{}, false, false
		}
		ev.HasRetry = true
	}
	if v, ok := m["data"]; ok {
		if v[0] == '"' {
			var s string
			if err := json.Unmarshal(v, &s); err != nil {
				return Event{}, false, false
			}
			ev.Data = []byte(s)
			strData = true
		} else {
			var b bytes.Buffer
			if err := json.Compact(&b, v); err != nil {
				return Event{}, false, false
			}
			ev.Data = b.Bytes()
		}
	}
	return ev, strData, true
}

// sameEvent reports how two decoded events differ.
func sameEvent(got, want Event) error {
	if got.ID != want.ID || got.Event != want.Event || !bytes.Equal(got.Data, want.Data) ||
		got.Retry != want.Retry || got.HasRetry != want.HasRetry || got.Close != want.Close {
		return fmt.Errorf("got %s, want %s", fmtEvent(got), fmtEvent(want))
	}
	return nil
}

func fmtEvent(ev Event) string {
	return fmt.Sprintf("{ID:%q Event:%q Data:%q Retry:%d HasRetry:%v Close:%v}",
		ev.ID, ev.Event, ev.Data, ev.Retry, ev.HasRetry, ev.Close)
}

func TestDecodeRaw(t *testing.T) {
	p := []byte(`{"data":"x"}`)
	ev, f := Decode(FormatRaw, p)
	if f != 0 || &ev.Data[0] != &p[0] || len(ev.Data) != len(p) || ev.ID != "" || ev.Event != "" || ev.HasRetry || ev.Close {
		t.Errorf("Decode(raw) = %s, %v; want the payload itself as data", fmtEvent(ev), f)
	}
	if ev, f := Decode(FormatRaw, nil); f != 0 || len(ev.Data) != 0 {
		t.Errorf("Decode(raw, nil) = %s, %v", fmtEvent(ev), f)
	}
}

func TestDecodeEnvelope(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     Event
	}{
		{"full", `{"event":"chat","id":"42","data":"hello","retry":3000,"close":false}`,
			Event{Event: "chat", ID: "42", Data: []byte("hello"), Retry: 3000, HasRetry: true}},
		{"empty object", `{}`, Event{}},
		{"whitespace around", " \r\n\t{ \"data\" : \"x\" } \n", Event{Data: []byte("x")}},
		{"object data compacted", `{"data": { "a" : [1, 2, {"b": "c d"}], "e": null }}`,
			Event{Data: []byte(`{"a":[1,2,{"b":"c d"}],"e":null}`)}},
		{"compact object data as is", `{"data":{"a":"b c"}}`, Event{Data: []byte(`{"a":"b c"}`)}},
		{"array data", `{"data":[ 1 ,"x" ]}`, Event{Data: []byte(`[1,"x"]`)}},
		{"number data", `{"data":-1.5e3}`, Event{Data: []byte(`-1.5e3`)}},
		{"bool data", `{"data":true}`, Event{Data: []byte(`true`)}},
		{"null data", `{"data":null}`, Event{Data: []byte(`null`)}},
		{"string data with newlines", `{"data":"a\nb\r\nc\rd"}`, Event{Data: []byte("a\nb\r\nc\rd")}},
		{"string data escapes", `{"data":"\"\\\/\b\f\t\u00e9\ud83d\ude00\u0000"}`,
			Event{Data: []byte("\"\\/\b\f\té😀\x00")}},
		{"lone surrogates", `{"data":"\ud800x\udc00\ud800\u0041\ud800"}`,
			Event{Data: []byte("\uFFFDx\uFFFD\uFFFDA\uFFFD")}},
		{"surrogates in wrong order", `{"data":"\udc00\ud800"}`, Event{Data: []byte("\uFFFD\uFFFD")}},
		{"escaped quote at end", `{"data":"a\\","id":"b\""}`, Event{Data: []byte(`a\`), ID: `b"`}},
		{"escaped key", `{"\u0065vent":"e"}`, Event{Event: "e"}},
		{"keys are case-sensitive", `{"Event":"e","DATA":"x"}`, Event{}},
		{"unknown fields ignored", `{"x":{"data":"no"},"y":[{"id":"no"}],"data":"yes","z":"\"}"}`,
			Event{Data: []byte("yes")}},
		{"last key wins", `{"data":"a","data":"b","id":1,"id":"2"}`, Event{Data: []byte("b"), ID: "2"}},
		{"null is absence", `{"event":null,"id":null,"retry":null,"close":null}`, Event{}},
		{"close", `{"close":true}`, Event{Close: true}},
		{"retry zero", `{"retry":0}`, Event{HasRetry: true}},
		{"retry minus zero", `{"retry":-0}`, Event{HasRetry: true}},
		{"retry max", `{"retry":9223372036854775807}`, Event{Retry: 1<<63 - 1, HasRetry: true}},
		{"NUL and LF kept for the encoder", `{"id":"1\u0000\n","event":"a\rb"}`, Event{ID: "1\x00\n", Event: "a\rb"}},
		{"invalid UTF-8 kept for the encoder", "{\"data\":\"\xff\"}", Event{Data: []byte("\xff")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ev, f := Decode(FormatEnvelope, []byte(tc.in))
			if f != 0 {
				t.Errorf("fault %v", f)
			}
			if err := sameEvent(ev, tc.want); err != nil {
				t.Error(err)
			}
			if oracle, _, ok := oracleDecode([]byte(tc.in)); ok && utf8.ValidString(tc.in) {
				if err := sameEvent(ev, oracle); err != nil {
					t.Errorf("against encoding/json: %v", err)
				}
			} else if !ok {
				t.Errorf("encoding/json rejects it")
			}
			if err := checkRoundTrip(&ev); err != nil {
				t.Error(err)
			}
		})
	}
}

func TestDecodeBadEnvelope(t *testing.T) {
	for _, in := range []string{
		``,
		` `,
		`hello`,
		`"data"`,
		`null`,
		`42`,
		`[{"data":"x"}]`,
		`{"data":"x"`,
		`{"data":"x"}}`,
		`{"data":"x"} {}`,
		`{"data":x}`,
		`{'data':'x'}`,
		`{"data":"a` + "\n" + `b"}`,
		"\uFEFF{}",
		`{"event":1}`,
		`{"event":["x"]}`,
		`{"id":42}`,
		`{"id":true}`,
		`{"retry":-1}`,
		`{"retry":1.5}`,
		`{"retry":1.0}`,
		`{"retry":1e3}`,
		`{"retry":"100"}`,
		`{"retry":9223372036854775808}`,
		`{"close":"true"}`,
		`{"close":1}`,
		`{"data":"ok","id":{}}`,
		`{"id":1,"id":"x","retry":-5}`,
		"{\"data\":\"x\rid: 9\"}",
	} {
		t.Run(in, func(t *testing.T) {
			ev, f := Decode(FormatEnvelope, []byte(in))
			if f != FaultBadEnvelope {
				t.Errorf("fault %v, want bad_envelope (event %s)", f, fmtEvent(ev))
			}
			if err := sameEvent(ev, Event{Data: []byte(in)}); err != nil {
				t.Error(err)
			}
			if _, _, ok := oracleDecode([]byte(in)); ok {
				t.Errorf("encoding/json accepts it")
			}
			if err := checkRoundTrip(&ev); err != nil {
				t.Error(err)
			}
		})
	}
}

func TestDecodeAllocs(t *testing.T) {
	p := []byte(`{"data":"hello, world","retry":10,"close":true}`)
	allocs := testing.AllocsPerRun(100, func() { Decode(FormatEnvelope, p) })
	if allocs != 0 {
		t.Errorf("decoding an envelope with no id, event or escapes allocates %v times", allocs)
	}
}

func TestParseFormat(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Format
		ok   bool
	}{{"raw", FormatRaw, true}, {"envelope", FormatEnvelope, true}, {"", FormatRaw, true},
		{"json", 0, false}, {"Raw", 0, false}} {
		f, err := ParseFormat(tc.in)
		if (err == nil) != tc.ok || (tc.ok && f != tc.want) {
			t.Errorf("ParseFormat(%q) = %v, %v", tc.in, f, err)
		}
		if tc.ok && tc.in != "" && f.String() != tc.in {
			t.Errorf("%v.String() = %q, want %q", f, f.String(), tc.in)
		}
	}
	if s := Format(9).String(); s != "Format(9)" {
		t.Errorf("Format(9).String() = %q", s)
	}
}

func TestFaultReasons(t *testing.T) {
	for _, tc := range []struct {
		f    Fault
		want string
	}{
		{0, "none"},
		{FaultBadEnvelope, "bad_envelope"},
		{FaultUnsafeField, "unsafe_field"},
		{FaultInvalidUTF8, "invalid_utf8"},
		{FaultBadEnvelope | FaultUnsafeField | FaultInvalidUTF8, "bad_envelope|unsafe_field|invalid_utf8"},
		{FaultUnsafeField | FaultInvalidUTF8 | 0x80, "unsafe_field|invalid_utf8"},
	} {
		if got := tc.f.String(); got != tc.want {
			t.Errorf("Fault(%d).String() = %q, want %q", tc.f, got, tc.want)
		}
	}
	if Fault(0).Reasons() != nil {
		t.Errorf("no fault has reasons")
	}
	f := FaultBadEnvelope | FaultInvalidUTF8
	if allocs := testing.AllocsPerRun(10, func() { _ = f.Reasons() }); allocs != 0 {
		t.Errorf("Reasons allocates %v times", allocs)
	}
}

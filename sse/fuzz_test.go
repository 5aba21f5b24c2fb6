package sse

import (
	"bytes"
	"testing"
	"unicode/utf8"
)

// The seed corpora live in testdata/fuzz/<FuzzName>/; inputs the fuzzer
// finds failing belong there too.

// FuzzAppendEvent checks that any event reaches a client as exactly one event
// with its data, type and id (after repair) and no other field.
func FuzzAppendEvent(f *testing.F) {
	f.Fuzz(func(t *testing.T, id, event string, data []byte, retry int64, hasRetry bool) {
		ev := Event{ID: id, Event: event, Data: data, Retry: retry, HasRetry: hasRetry}
		if err := checkRoundTrip(&ev); err != nil {
			t.Fatal(err)
		}
	})
}

// FuzzDecodeEnvelope checks that no payload is lost: a bad envelope comes out
// as the payload itself, a good one decodes as encoding/json reads it, and
// either way the event reaches a client intact.
func FuzzDecodeEnvelope(f *testing.F) {
	f.Fuzz(func(t *testing.T, payload []byte) {
		orig := bytes.Clone(payload)
		ev, fault := Decode(FormatEnvelope, payload)
		if !bytes.Equal(payload, orig) {
			t.Fatalf("Decode modified its input")
		}
		oracle, strData, ok := oracleDecode(payload)
		switch fault {
		case FaultBadEnvelope:
			if ok {
				t.Fatalf("rejected, but encoding/json reads %s", fmtEvent(oracle))
			}
			if err := sameEvent(ev, Event{Data: payload}); err != nil {
				t.Fatalf("bad envelope not delivered raw: %v", err)
			}
		case 0:
			if !ok {
				t.Fatalf("accepted as %s, but encoding/json rejects it", fmtEvent(ev))
			}
			// encoding/json replaces each invalid UTF-8 byte in strings
			// with U+FFFD where Decode leaves it to the encoder; compare
			// the decoded strings with the same replacement applied.
			got := ev
			got.ID, got.Event = perByteValid(ev.ID), perByteValid(ev.Event)
			if strData {
				got.Data = []byte(perByteValid(string(ev.Data)))
			}
			if err := sameEvent(got, oracle); err != nil {
				t.Fatal(err)
			}
		default:
			t.Fatalf("fault %v", fault)
		}
		if err := checkRoundTrip(&ev); err != nil {
			t.Fatal(err)
		}
	})
}

// perByteValid replaces each byte of invalid UTF-8 with U+FFFD, as
// encoding/json does in strings.
func perByteValid(s string) string {
	if utf8.ValidString(s) {
		return s
	}
	var b []byte
	for _, r := range s {
		b = utf8.AppendRune(b, r)
	}
	return string(b)
}

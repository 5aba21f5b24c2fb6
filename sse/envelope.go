package sse

import (
	"bytes"
	"encoding/json"
	"unicode/utf16"
	"unicode/utf8"
)

// Decode turns a published payload into an Event as format f says.
//
// FormatRaw (and any unknown Format): Data is payload itself, not a copy.
//
// FormatEnvelope: payload is a JSON object
//
//	{"event": string, "id": string, "data": any, "retry": integer, "close": bool}
//
// with every member optional. Keys match exactly (case-sensitive); of a key
// given twice the last wins; unknown keys are ignored; null for event, id,
// retry or close is the same as leaving it out. A data that is a JSON string
// becomes Data unescaped; any other JSON value (object, array, number, bool,
// null) becomes Data compactly encoded; no data is empty Data. retry is in
// milliseconds and must be a non-negative integer written without fraction
// or exponent; it sets HasRetry. Data may share memory with payload.
//
// A payload that is not such an object (not JSON, not an object, a member of
// the wrong type, a negative or fractional retry) is never dropped: it is
// delivered as raw data, with FaultBadEnvelope.
//
// Decode leaves the repair of CR, LF and NUL in event and id and of invalid
// UTF-8 to AppendEvent, which reports them.
func Decode(f Format, payload []byte) (Event, Fault) {
	if f != FormatEnvelope {
		return Event{Data: payload}, 0
	}
	ev, ok := decodeEnvelope(payload)
	if !ok {
		return Event{Data: payload}, FaultBadEnvelope
	}
	return ev, 0
}

// Member indexes in decodeEnvelope's table of values.
const (
	memberEvent = iota
	memberID
	memberData
	memberRetry
	memberClose
	memberCount
)

// decodeEnvelope decodes an envelope; ok is false when p is not one.
//
// json.Valid checks the whole payload first (Unmarshal would do the same
// check before its reflective decoding), so the walk below runs over valid
// JSON and only has to find where each value ends.
func decodeEnvelope(p []byte) (ev Event, ok bool) {
	i := skipSpace(p, 0)
	if i == len(p) || p[i] != '{' || !json.Valid(p) {
		return Event{}, false
	}
	// The last raw value of each known member; nil when absent.
	var raw [memberCount][]byte
	i = skipSpace(p, i+1)
	for p[i] != '}' {
		end := stringEnd(p, i)
		key := p[i+1 : end-1]
		if bytes.IndexByte(key, '\\') >= 0 {
			key = unquote(key) // rare: an escaped key still names a member
		}
		i = skipSpace(p, end) // at ':'
		i = skipSpace(p, i+1) // at the value
		end = valueEnd(p, i)
		switch string(key) {
		case "event":
			raw[memberEvent] = p[i:end]
		case "id":
			raw[memberID] = p[i:end]
		case "data":
			raw[memberData] = p[i:end]
		case "retry":
			raw[memberRetry] = p[i:end]
		case "close":
			raw[memberClose] = p[i:end]
		}
		i = skipSpace(p, end) // at ',' or '}'
		if p[i] == ',' {
			i = skipSpace(p, i+1)
		}
	}

	if ev.Event, ok = stringMember(raw[memberEvent]); !ok {
		return Event{}, false
	}
	if ev.ID, ok = stringMember(raw[memberID]); !ok {
		return Event{}, false
	}
	if ev.Retry, ev.HasRetry, ok = retryMember(raw[memberRetry]); !ok {
		return Event{}, false
	}
	switch v := raw[memberClose]; {
	case v == nil || string(v) == "null" || string(v) == "false":
	case string(v) == "true":
		ev.Close = true
	default:
		return Event{}, false
	}
	switch v := raw[memberData]; {
	case v == nil:
	case v[0] == '"':
		ev.Data = unquote(v[1 : len(v)-1])
	case !bytes.ContainsAny(v, " \t\r\n"):
		// Already compact: JSON strings cannot hold a raw tab, CR or LF,
		// and with no space anywhere there is no whitespace to remove.
		ev.Data = v
	default:
		ev.Data = compact(make([]byte, 0, len(v)), v)
	}
	return ev, true
}

// compact appends the valid JSON value v to dst without the whitespace
// between tokens, as json.Compact does; knowing v valid, it only has to
// step over strings, and runs several times faster.
func compact(dst, v []byte) []byte {
	for i := 0; i < len(v); {
		switch c := v[i]; c {
		case ' ', '\t', '\r', '\n':
			i++
		case '"':
			end := stringEnd(v, i)
			dst = append(dst, v[i:end]...)
			i = end
		default:
			dst = append(dst, c)
			i++
		}
	}
	return dst
}

// stringMember decodes the raw value of the event or id member.
func stringMember(v []byte) (string, bool) {
	switch {
	case v == nil || string(v) == "null":
		return "", true
	case v[0] == '"':
		return string(unquote(v[1 : len(v)-1])), true
	}
	return "", false
}

// retryMember decodes the raw value of the retry member: a JSON number that
// is a non-negative integer with no fraction or exponent and fits int64.
func retryMember(v []byte) (ms int64, set, ok bool) {
	if v == nil || string(v) == "null" {
		return 0, false, true
	}
	digits := v
	if digits[0] == '-' {
		digits = digits[1:] // only "-0" can pass below
	}
	if len(digits) == 0 {
		return 0, false, false
	}
	for _, c := range digits {
		if c < '0' || c > '9' {
			return 0, false, false // fraction, exponent or not a number
		}
		d := int64(c - '0')
		if ms > (1<<63-1-d)/10 {
			return 0, false, false // past int64
		}
		ms = ms*10 + d
	}
	if ms != 0 && len(digits) != len(v) {
		return 0, false, false // negative
	}
	return ms, true, true
}

// skipSpace returns the index of the first byte at or after i that is not
// JSON whitespace.
func skipSpace(p []byte, i int) int {
	for i < len(p) {
		switch p[i] {
		case ' ', '\t', '\r', '\n':
			i++
		default:
			return i
		}
	}
	return i
}

// stringEnd returns the index just past the closing quote of the valid JSON
// string that opens at p[i].
func stringEnd(p []byte, i int) int {
	j := i + 1
	for {
		j += bytes.IndexByte(p[j:], '"')
		// The quote closes the string unless an odd run of backslashes
		// escapes it. Runs before different quotes do not overlap, so this
		// stays linear.
		n := 0
		for k := j - 1; p[k] == '\\'; k-- {
			n++
		}
		if n%2 == 0 {
			return j + 1
		}
		j++
	}
}

// valueEnd returns the index just past the valid JSON value that starts at
// p[i].
func valueEnd(p []byte, i int) int {
	switch p[i] {
	case '"':
		return stringEnd(p, i)
	case '{', '[':
		depth := 0
		for {
			switch p[i] {
			case '"':
				i = stringEnd(p, i)
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1
				}
			}
			i++
		}
	}
	// A number, true, false or null: it ends where the next delimiter is.
	for i < len(p) {
		switch p[i] {
		case ',', '}', ']', ' ', '\t', '\r', '\n':
			return i
		}
		i++
	}
	return i
}

// unquote returns the content s of a valid JSON string (without its quotes)
// unescaped. Without escapes it returns s itself. Like encoding/json it turns
// an escaped lone surrogate into U+FFFD; unlike it, it leaves invalid UTF-8
// as it is, for AppendEvent to repair and report.
func unquote(s []byte) []byte {
	k := bytes.IndexByte(s, '\\')
	if k < 0 {
		return s
	}
	b := make([]byte, 0, len(s))
	for {
		b = append(b, s[:k]...)
		s = s[k:]
		if len(s) == 0 {
			return b
		}
		// s[0] is a backslash that starts a valid escape.
		switch c := s[1]; c {
		case 'b':
			b = append(b, '\b')
		case 'f':
			b = append(b, '\f')
		case 'n':
			b = append(b, '\n')
		case 'r':
			b = append(b, '\r')
		case 't':
			b = append(b, '\t')
		case 'u':
			r := hex4(s[2:6])
			s = s[6:]
			if utf16.IsSurrogate(r) {
				r2 := rune(-1)
				if len(s) >= 6 && s[0] == '\\' && s[1] == 'u' {
					r2 = hex4(s[2:6])
				}
				if d := utf16.DecodeRune(r, r2); d != utf8.RuneError {
					r = d
					s = s[6:]
				} else {
					r = utf8.RuneError
				}
			}
			b = utf8.AppendRune(b, r)
			k = bytes.IndexByte(s, '\\')
			if k < 0 {
				k = len(s)
			}
			continue
		default: // '"', '\\' and '/' stand for themselves
			b = append(b, c)
		}
		s = s[2:]
		k = bytes.IndexByte(s, '\\')
		if k < 0 {
			k = len(s)
		}
	}
}

// hex4 decodes the four hex digits of a valid \u escape.
func hex4(h []byte) rune {
	var r rune
	for _, c := range h[:4] {
		switch {
		case c <= '9':
			c -= '0'
		case c <= 'F':
			c -= 'A' - 10
		default:
			c -= 'a' - 10
		}
		r = r<<4 | rune(c)
	}
	return r
}

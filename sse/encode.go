package sse

import (
	"bytes"
	"strconv"
	"unicode/utf8"
)

// Comment is the opening line of a stream and the keepalive: a single ":"
// line with no blank line after it, because some clients
// (fetch-event-source) fire an empty message on every blank line.
var Comment = []byte(":\n")

// replacementChar is U+FFFD in UTF-8, written for every invalid UTF-8
// sequence and for every CR, LF or NUL in an id or event value.
const replacementChar = "\uFFFD"

// AppendEvent appends the wire form of ev to dst and reports the repairs it
// made. The frame is, in this order: "id: " line (when ID is not empty),
// "event: " line (when Event is not empty), "retry: " line (when HasRetry and
// Retry >= 0; a negative Retry is left out), one "data: " line per line of
// Data, and a blank line.
//
// Every line is written as field name, ":", one space and the value, so a
// value that begins with a space keeps it. An empty line of data, and so an
// empty Data, is written "data: \n" (the space included) rather than
// "data:\n": both decode to the empty string, and the single rule also suits
// naive clients that look for the "data: " prefix.
//
// Data is split on CRLF, LF and a lone CR, as a client splits it, so the
// client reads Data back with its line breaks made LF. CR, LF and NUL in ID
// or Event are replaced with U+FFFD (FaultUnsafeField): they would end the
// field early or make the client ignore the id. Invalid UTF-8 anywhere is
// replaced with one U+FFFD per maximal invalid subpart, as a browser decodes
// it (FaultInvalidUTF8). Nothing else is changed and no BOM is written.
//
// AppendEvent does not allocate when dst has room and ev needs no repair.
func AppendEvent(dst []byte, ev *Event) ([]byte, Fault) {
	var f Fault
	if ev.ID != "" {
		dst = append(dst, "id: "...)
		dst, f = appendField(dst, ev.ID, f)
	}
	if ev.Event != "" {
		dst = append(dst, "event: "...)
		dst, f = appendField(dst, ev.Event, f)
	}
	if ev.HasRetry {
		dst = AppendRetry(dst, ev.Retry)
	}
	dst, f = appendData(dst, ev.Data, f)
	return append(dst, '\n'), f
}

// AppendRetry appends "retry: <ms>\n" with no blank line after it, for the
// reconnection hint sent at stream start; it appends nothing for a negative
// ms, which the field cannot express.
func AppendRetry(dst []byte, ms int64) []byte {
	if ms < 0 {
		return dst
	}
	dst = append(dst, "retry: "...)
	dst = strconv.AppendInt(dst, ms, 10)
	return append(dst, '\n')
}

// appendField appends the value of an id or event field and its LF.
func appendField(dst []byte, s string, f Fault) ([]byte, Fault) {
	ascii := true
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '\r' || c == '\n' || c == 0:
			return appendRepaired(dst, s, f)
		case c >= utf8.RuneSelf:
			ascii = false
		}
	}
	if !ascii && !utf8.ValidString(s) {
		return appendRepaired(dst, s, f)
	}
	dst = append(dst, s...)
	return append(dst, '\n'), f
}

// appendRepaired is the slow path of appendField.
func appendRepaired(dst []byte, s string, f Fault) ([]byte, Fault) {
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c == '\r' || c == '\n' || c == 0 {
				dst = append(dst, replacementChar...)
				f |= FaultUnsafeField
			} else {
				dst = append(dst, c)
			}
			i++
			continue
		}
		n, ok := seqLen(s[i:])
		if ok {
			dst = append(dst, s[i:i+n]...)
		} else {
			dst = append(dst, replacementChar...)
			f |= FaultInvalidUTF8
		}
		i += n
	}
	return append(dst, '\n'), f
}

// appendData appends one "data: " line per line of data.
func appendData(dst, data []byte, f Fault) ([]byte, Fault) {
	valid := utf8.Valid(data)
	if !valid {
		f |= FaultInvalidUTF8
	}
	// cr and lf are the next CR and LF at or after start, -1 when there is
	// none left; each is searched again only once passed, so the data is
	// scanned about once whatever the mix of line breaks.
	cr, lf := -2, -2
	start := 0
	for {
		if cr != -1 && cr < start {
			cr = indexFrom(data, start, '\r')
		}
		if lf != -1 && lf < start {
			lf = indexFrom(data, start, '\n')
		}
		end, next := len(data), -1
		switch {
		case cr >= 0 && (lf < 0 || cr < lf):
			end, next = cr, cr+1
			if next < len(data) && data[next] == '\n' {
				next++
			}
		case lf >= 0:
			end, next = lf, lf+1
		}
		dst = append(dst, "data: "...)
		if valid {
			dst = append(dst, data[start:end]...)
		} else {
			dst = appendValidUTF8(dst, data[start:end])
		}
		dst = append(dst, '\n')
		if next < 0 {
			return dst, f
		}
		start = next
	}
}

// indexFrom returns the index in b of the first c at or after start, or -1.
func indexFrom(b []byte, start int, c byte) int {
	i := bytes.IndexByte(b[start:], c)
	if i < 0 {
		return -1
	}
	return start + i
}

// appendValidUTF8 appends b with each maximal invalid subpart replaced with
// U+FFFD.
func appendValidUTF8(dst, b []byte) []byte {
	for i := 0; i < len(b); {
		if b[i] < utf8.RuneSelf {
			// Copy the whole ASCII run at once.
			j := i + 1
			for j < len(b) && b[j] < utf8.RuneSelf {
				j++
			}
			dst = append(dst, b[i:j]...)
			i = j
			continue
		}
		n, ok := seqLen(b[i:])
		if ok {
			dst = append(dst, b[i:i+n]...)
		} else {
			dst = append(dst, replacementChar...)
		}
		i += n
	}
	return dst
}

// seqLen looks at the UTF-8 sequence at the start of s, whose first byte is
// not ASCII. For a valid sequence it returns its length and true. Otherwise it
// returns the length of the maximal subpart (1 to 3 bytes) that the WHATWG
// UTF-8 decoder, as browsers run it, replaces with a single U+FFFD; repairing
// the same way means a client sees exactly what it would have decoded itself.
func seqLen[T string | []byte](s T) (int, bool) {
	// need is the number of continuation bytes; lo and hi bound the first
	// of them, which excludes overlong forms, surrogates and values past
	// U+10FFFF.
	var need int
	lo, hi := byte(0x80), byte(0xBF)
	switch c := s[0]; {
	case c >= 0xC2 && c <= 0xDF:
		need = 1
	case c == 0xE0:
		need, lo = 2, 0xA0
	case c == 0xED:
		need, hi = 2, 0x9F
	case c >= 0xE1 && c <= 0xEF:
		need = 2
	case c == 0xF0:
		need, lo = 3, 0x90
	case c == 0xF4:
		need, hi = 3, 0x8F
	case c >= 0xF1 && c <= 0xF3:
		need = 3
	default:
		return 1, false
	}
	for i := 1; i <= need; i++ {
		if i >= len(s) || s[i] < lo || s[i] > hi {
			return i, false
		}
		lo, hi = 0x80, 0xBF
	}
	return need + 1, true
}

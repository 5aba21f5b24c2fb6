package main

import (
	"bytes"
	"errors"
	"strconv"
)

// This file holds the client's wire parsing: the response head, the chunked
// transfer coding and the event stream, each a small state machine fed the
// bytes as they arrive, so that a stream needs no buffer but its reader's.

// errStatus is a response other than 200.
type errStatus struct{ code int }

func (e errStatus) Error() string { return "status " + strconv.Itoa(e.code) }

var errBadResponse = errors.New("malformed response")

// head is what the client needs from a response head.
type head struct {
	status  int
	chunked bool
}

// parseStatusLine reads the status code of "HTTP/1.1 200 OK".
func parseStatusLine(line []byte) (int, error) {
	line = bytes.TrimRight(line, "\r\n")
	if !bytes.HasPrefix(line, []byte("HTTP/1.")) {
		return 0, errBadResponse
	}
	_, rest, ok := bytes.Cut(line, []byte(" "))
	if !ok || len(rest) < 3 {
		return 0, errBadResponse
	}
	code, err := strconv.Atoi(string(rest[:3]))
	if err != nil {
		return 0, errBadResponse
	}
	return code, nil
}

// headerChunked tells whether a header line is "Transfer-Encoding: chunked".
func headerChunked(line []byte) bool {
	name, value, ok := bytes.Cut(line, []byte(":"))
	if !ok || !bytes.EqualFold(bytes.TrimSpace(name), []byte("Transfer-Encoding")) {
		return false
	}
	return bytes.Contains(bytes.ToLower(value), []byte("chunked"))
}

// dechunker undoes the chunked transfer coding, handing the payload bytes
// to out. A body that is not chunked passes through.
type dechunker struct {
	chunked bool
	state   int
	size    int64 // bytes left in the current chunk, or the size being read
	bad     bool
	done    bool
}

const (
	chunkSize  = iota // reading the hex size
	chunkExt          // skipping a chunk extension up to LF
	chunkData         // copying size bytes
	chunkCRLF         // skipping the CRLF after the data
	chunkTrail        // after the last chunk
)

// feed decodes b, calling out with each run of payload bytes.
func (d *dechunker) feed(b []byte, out func([]byte)) {
	if !d.chunked {
		out(b)
		return
	}
	for len(b) > 0 && !d.bad && !d.done {
		switch d.state {
		case chunkSize:
			c := b[0]
			b = b[1:]
			switch {
			case c >= '0' && c <= '9':
				d.size = d.size<<4 | int64(c-'0')
			case c >= 'a' && c <= 'f':
				d.size = d.size<<4 | int64(c-'a'+10)
			case c >= 'A' && c <= 'F':
				d.size = d.size<<4 | int64(c-'A'+10)
			case c == ';' || c == '\r' || c == ' ' || c == '\t':
				d.state = chunkExt
			case c == '\n':
				d.endSize()
			default:
				d.bad = true
			}
			if d.size > 1<<40 {
				d.bad = true
			}
		case chunkExt:
			i := bytes.IndexByte(b, '\n')
			if i < 0 {
				return
			}
			b = b[i+1:]
			d.endSize()
		case chunkData:
			n := int64(len(b))
			if n > d.size {
				n = d.size
			}
			out(b[:n])
			b = b[n:]
			d.size -= n
			if d.size == 0 {
				d.state = chunkCRLF
			}
		case chunkCRLF:
			i := bytes.IndexByte(b, '\n')
			if i < 0 {
				return
			}
			b = b[i+1:]
			d.state = chunkSize
		case chunkTrail:
			d.done = true
		}
	}
}

func (d *dechunker) endSize() {
	if d.size == 0 {
		d.state = chunkTrail
		d.done = true
		return
	}
	d.state = chunkData
}

// eventParser reads an event stream just far enough to count events and
// take the send time out of their data. A line is kept up to lineMax bytes
// (the rest is skipped: only the start of the data matters); lines end at
// LF, CR or CRLF; a blank line dispatches the event if it had data.
type eventParser struct {
	line    [lineMax]byte
	n       int  // bytes of the current line seen (may exceed lineMax)
	prevCR  bool // the last byte was a CR: an LF right after it ends nothing
	hasData bool
	sent    int64 // send time from the event's data, -1 if none
	// onEvent is called for each dispatched event with its send time
	// (nanoseconds on the tool's clock), or -1 when the data had none.
	onEvent func(sent int64)
}

const lineMax = 64

func (p *eventParser) feed(b []byte) {
	for len(b) > 0 {
		if p.prevCR {
			p.prevCR = false
			if b[0] == '\n' {
				b = b[1:]
				continue
			}
		}
		i := bytes.IndexAny(b, "\r\n")
		if i < 0 {
			p.add(b)
			return
		}
		p.add(b[:i])
		p.prevCR = b[i] == '\r'
		b = b[i+1:]
		p.endLine()
	}
}

func (p *eventParser) add(b []byte) {
	if p.n < lineMax {
		copy(p.line[p.n:], b)
	}
	p.n += len(b)
}

func (p *eventParser) endLine() {
	n := min(p.n, lineMax)
	line := p.line[:n]
	p.n = 0
	if n == 0 {
		if p.hasData {
			p.onEvent(p.sent)
		}
		p.hasData = false
		return
	}
	if !bytes.HasPrefix(line, []byte("data:")) {
		return // comments, id, event, retry: nothing to count
	}
	if p.hasData {
		return // a later data line of the same event
	}
	p.hasData = true
	p.sent = parseSent(bytes.TrimPrefix(line[5:], []byte(" ")))
}

// payloadPrefix starts every payload the tool publishes; the send time in
// nanoseconds on the tool's monotonic clock follows.
const payloadPrefix = "t="

// parseSent reads the send time from "t=<ns> ...", or -1.
func parseSent(data []byte) int64 {
	if !bytes.HasPrefix(data, []byte(payloadPrefix)) {
		return -1
	}
	data = data[len(payloadPrefix):]
	var v int64
	i := 0
	for ; i < len(data) && data[i] >= '0' && data[i] <= '9'; i++ {
		v = v*10 + int64(data[i]-'0')
	}
	if i == 0 || i > 18 {
		return -1
	}
	return v
}

// appendPayload builds a payload of about size bytes carrying the send time.
func appendPayload(buf []byte, sent int64, size int) []byte {
	buf = append(buf, payloadPrefix...)
	buf = strconv.AppendInt(buf, sent, 10)
	if len(buf) < size {
		buf = append(buf, ' ')
	}
	for len(buf) < size {
		buf = append(buf, 'x')
	}
	return buf
}

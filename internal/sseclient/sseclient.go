// Package sseclient is a small Server-Sent Events client for tests and the
// load tool. It parses the stream as the WHATWG algorithm does, and keeps
// the raw bytes and comment lines so that tests can assert what was on the
// wire.
package sseclient

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"
)

// Event is one dispatched event.
type Event struct {
	ID    string
	Event string // "message" when the stream named none
	Data  string
	Retry string // the last retry field seen before this event, if any
}

// Stream is an open event stream.
type Stream struct {
	Resp   *http.Response
	cancel context.CancelFunc
	events chan Event
	done   chan struct{}
	err    error

	mu       sync.Mutex
	raw      bytes.Buffer
	comments int
	lastID   string
}

// Open sends the request and returns once the response headers arrived. A
// status other than 200 is returned with the response body in the error.
func Open(ctx context.Context, client *http.Client, req *http.Request) (*Stream, error) {
	if client == nil {
		client = http.DefaultClient
	}
	ctx, cancel := context.WithCancel(ctx)
	req = req.WithContext(ctx)
	if req.Header.Get("Accept") == "" {
		req.Header.Set("Accept", "text/event-stream")
	}
	resp, err := client.Do(req)
	if err != nil {
		cancel()
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		cancel()
		return nil, &StatusError{Code: resp.StatusCode, Header: resp.Header, Body: string(body)}
	}
	s := &Stream{Resp: resp, cancel: cancel, events: make(chan Event, 1<<16), done: make(chan struct{})}
	go s.read()
	return s, nil
}

// Get opens a GET stream on url with optional header pairs ("Name", "value", ...).
func Get(ctx context.Context, url string, header ...string) (*Stream, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	return Open(ctx, nil, req)
}

// StatusError is a refused stream.
type StatusError struct {
	Code   int
	Header http.Header
	Body   string
}

func (e *StatusError) Error() string { return fmt.Sprintf("status %d: %s", e.Code, e.Body) }

// ErrTimeout is returned by Next when no event arrived in time.
var ErrTimeout = errors.New("sseclient: no event in time")

// Next returns the next event, waiting up to timeout.
func (s *Stream) Next(timeout time.Duration) (Event, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case ev, ok := <-s.events:
		if !ok {
			return Event{}, s.closedErr()
		}
		return ev, nil
	case <-t.C:
		return Event{}, ErrTimeout
	}
}

func (s *Stream) closedErr() error {
	if s.err != nil {
		return s.err
	}
	return io.EOF
}

// Done is closed when the server ended the stream (or Close was called).
func (s *Stream) Done() <-chan struct{} { return s.done }

// Err is why the stream ended: io.EOF for a clean end by the server.
func (s *Stream) Err() error {
	<-s.done
	return s.closedErr()
}

// Raw returns every byte received so far.
func (s *Stream) Raw() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.raw.String()
}

// Comments counts the comment lines received so far.
func (s *Stream) Comments() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.comments
}

// LastEventID is the stream's last event id, as a browser would send it on
// reconnect.
func (s *Stream) LastEventID() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastID
}

// Close ends the stream from the client side.
func (s *Stream) Close() {
	s.cancel()
	<-s.done
}

type teeReader struct {
	s *Stream
	r io.Reader
}

func (t teeReader) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	if n > 0 {
		t.s.mu.Lock()
		t.s.raw.Write(p[:n])
		t.s.mu.Unlock()
	}
	return n, err
}

// read parses the stream: lines end at CRLF, LF or a lone CR; a blank line
// dispatches; "field: value" loses one space after the colon.
func (s *Stream) read() {
	defer close(s.done)
	defer close(s.events)
	defer s.Resp.Body.Close()
	br := bufio.NewReader(teeReader{s, s.Resp.Body})
	var data strings.Builder
	var hasData bool
	var event, retry string
	for {
		line, err := readLine(br)
		if err != nil {
			if !errors.Is(err, io.EOF) {
				s.err = err
			}
			return
		}
		if line == "" {
			if hasData {
				ev := Event{ID: s.LastEventID(), Event: event, Data: data.String(), Retry: retry}
				if ev.Event == "" {
					ev.Event = "message"
				}
				s.events <- ev
			}
			data.Reset()
			hasData, event = false, ""
			continue
		}
		if line[0] == ':' {
			s.mu.Lock()
			s.comments++
			s.mu.Unlock()
			continue
		}
		field, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		switch field {
		case "data":
			if hasData {
				data.WriteByte('\n')
			}
			data.WriteString(value)
			hasData = true
		case "event":
			event = value
		case "id":
			if !strings.ContainsRune(value, 0) {
				s.mu.Lock()
				s.lastID = value
				s.mu.Unlock()
			}
		case "retry":
			retry = value
		}
	}
}

func readLine(br *bufio.Reader) (string, error) {
	var b []byte
	for {
		c, err := br.ReadByte()
		if err != nil {
			return "", err
		}
		switch c {
		case '\n':
			return string(b), nil
		case '\r':
			if next, err := br.Peek(1); err == nil && next[0] == '\n' {
				_, _ = br.ReadByte()
			}
			return string(b), nil
		}
		b = append(b, c)
	}
}

// Package sse is the wire format of Server-Sent Events: the Event type, the
// encoder that turns one event into one immutable frame, the decoder of
// published envelopes, and the repair of anything that would break framing.
// It does no I/O.
package sse

// Event is one server-sent event before encoding.
type Event struct {
	// ID becomes the `id:` field when not empty.
	ID string
	// Event becomes the `event:` field when not empty.
	Event string
	// Data becomes one `data:` line per line of Data.
	Data []byte
	// Retry in milliseconds becomes the `retry:` field when HasRetry is set
	// (a negative Retry is never written).
	Retry int64
	// HasRetry says that Retry is set, since 0 is a valid retry.
	HasRetry bool
	// Close asks the server to end the streams of the event's channel after
	// delivering it. It is never written on the wire.
	Close bool
}

// Format says how a published payload becomes an Event.
type Format uint8

const (
	// FormatRaw: the payload is the event's data.
	FormatRaw Format = iota
	// FormatEnvelope: the payload is JSON {"event","id","data","retry","close"}.
	FormatEnvelope
)

// Fault is a set of repairs made to a message; each is counted by the caller.
type Fault uint8

const (
	// FaultBadEnvelope: the payload was not a valid envelope and was sent as raw data.
	FaultBadEnvelope Fault = 1 << iota
	// FaultUnsafeField: an event or id value held CR, LF or NUL and was repaired.
	FaultUnsafeField
	// FaultInvalidUTF8: invalid UTF-8 was replaced with U+FFFD.
	FaultInvalidUTF8
)

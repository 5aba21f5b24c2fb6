package broker

// This file fixes the broker's API; the implementation lives beside it.

import (
	"context"
	"time"
)

// Message is one message received on the subscription connection, or one
// event read back from history.
type Message struct {
	Channel string
	// Payload is what the publisher sent, with the history framing removed.
	Payload []byte
	// Seq is the history sequence number (the SSE event id) of a resumable
	// event, 0 for a plain PUBLISH.
	Seq uint64
}

// Handler receives what the subscription connection reads.
type Handler interface {
	// HandleMessage is called from the single reader goroutine, in the order
	// Redis delivered the messages. It must never block.
	HandleMessage(m Message)
	// HandleReconnect is called (from its own goroutine, not the reader) after
	// the subscription connection was lost and re-established and every
	// channel was resubscribed and confirmed: messages published in the gap
	// were not received.
	//
	// It is also called when the first connection succeeds after New found
	// Redis unreachable (Subscribe returned ErrDown meanwhile). Calls may
	// overlap if the connection flaps, and the function library is reloaded
	// before it is called.
	HandleReconnect()
	// HandleDisconnect is called on the reader goroutine as soon as the
	// subscription connection is lost (once per outage), before anything
	// read on a new connection is handed over: a handler that catches up
	// from history holds live messages from then on.
	HandleDisconnect()
}

// ChannelHandler is a Handler that can be told of an outage of some
// channels only. In sharded mode, when the connection to a master is lost
// or a slot moves to another master, the broker tells it
// HandleChannelsDown with the channels concerned (instead of
// HandleDisconnect, which would hold every channel), then, once they are
// subscribed again, HandleChannelsUp with the same channels, from its own
// goroutine. Every call of HandleChannelsDown is followed by one of
// HandleChannelsUp with the same channels.
type ChannelHandler interface {
	Handler
	HandleChannelsDown(channels []string)
	HandleChannelsUp(channels []string)
}

// Retention is the history kept per channel for resume.
type Retention struct {
	// MaxLen keeps about this many events per channel (0: no history).
	MaxLen int64
	// TTL drops a channel's history after this long without a publish (0: never).
	TTL time.Duration
}

// Replay is what history holds after a given id on a set of channels.
type Replay struct {
	// Messages in Seq order, merged across channels.
	Messages []Message
	// Truncated is true when events after the given id were already trimmed
	// from at least one channel's history: the client may have missed some.
	Truncated bool
}

// Page is one page of history read by ReplayPage.
type Page struct {
	// Messages are every retained message of the channels with an id above
	// the given one and up to Next, in Seq order.
	Messages []Message
	// Truncated is true when some history between the given id and the
	// first message is gone (trimmed, expired, or lost by Redis): the
	// client may have missed some.
	Truncated bool
	// More is true when there may be more after Next: call again with
	// after = Next.
	More bool
	// Next is the id up to which this page is complete.
	Next uint64
}

// Interface guard: the registry sees the broker through these methods.
var _ interface {
	Subscribe(ctx context.Context, channels ...string) error
	Unsubscribe(channels ...string)
	Replay(ctx context.Context, channels []string, after uint64) (Replay, error)
	ReplayPage(ctx context.Context, channels []string, after uint64, count int64) (Page, error)
} = (*Broker)(nil)

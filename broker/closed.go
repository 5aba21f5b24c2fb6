package broker

import (
	"context"
	"fmt"
	"time"
)

// ClosedKeyPrefix prefixes the key that marks a channel a publisher ended
// with a close envelope, so that a client reconnecting to it on any instance
// is told to stop (204) instead of waiting on a finished channel.
const ClosedKeyPrefix = "sse:closed:"

// ClosedTTL is how long a closed channel stays marked. Publishers name a
// fresh channel per job (chat:<id>), so the mark only has to outlive the
// clients' reconnects.
const ClosedTTL = 10 * time.Minute

// MarkClosed records that channel was ended by its publisher.
func (b *Broker) MarkClosed(ctx context.Context, channel string) error {
	if err := b.client.Set(ctx, ClosedKeyPrefix+channel, 1, ClosedTTL).Err(); err != nil {
		return fmt.Errorf("broker: mark channel %q closed: %w", channel, err)
	}
	return nil
}

// Closed returns those of channels that were ended by their publisher.
func (b *Broker) Closed(ctx context.Context, channels []string) ([]string, error) {
	// One EXISTS per key: in a cluster the keys live on different slots.
	pipe := b.client.Pipeline()
	cmds := make([]interface{ Val() int64 }, len(channels))
	for i, c := range channels {
		cmds[i] = pipe.Exists(ctx, ClosedKeyPrefix+c)
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return nil, fmt.Errorf("broker: check closed channels: %w", err)
	}
	var closed []string
	for i, c := range cmds {
		if c.Val() > 0 {
			closed = append(closed, channels[i])
		}
	}
	return closed, nil
}

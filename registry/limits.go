package registry

import (
	"slices"
	"sync"
)

// Limits holds the open streams of every key (a user, a client address) for
// a per-key cap such as max_connections_per, oldest first. One Limits is
// shared by every config of a process, so that a config reload does not
// reset the counts of the streams that outlive it.
type Limits struct {
	mu      sync.Mutex
	streams map[string][]*Subscriber
}

// NewLimits returns an empty table.
func NewLimits() *Limits {
	return &Limits{streams: make(map[string][]*Subscriber)}
}

// Admit counts sub under key, which may hold at most max streams. Past it,
// with evict the oldest streams of key end (ReasonEvicted) to make room;
// without, sub is refused (ok false). release, to call when sub's stream
// ends, uncounts it; it may be called more than once.
func (l *Limits) Admit(key string, max int, evict bool, sub *Subscriber) (release func(), ok bool) {
	var evicted []*Subscriber
	l.mu.Lock()
	list := l.streams[key]
	if len(list) >= max {
		if !evict {
			l.mu.Unlock()
			return nil, false
		}
		n := len(list) - max + 1
		evicted = append(evicted, list[:n]...)
		// slices.Delete clears the freed tail, so that the array does not
		// keep the evicted subscribers alive.
		list = slices.Delete(list, 0, n)
	}
	l.streams[key] = append(list, sub)
	l.mu.Unlock()

	// An evicted stream leaves the count now, so that the key never holds
	// more than max; its own release then finds nothing to remove.
	for _, s := range evicted {
		s.End(ReasonEvicted)
	}
	var once sync.Once
	return func() { once.Do(func() { l.release(key, sub) }) }, true
}

// release removes sub from key's streams, and the key once it has none, so
// that the table holds only keys with open streams.
func (l *Limits) release(key string, sub *Subscriber) {
	l.mu.Lock()
	defer l.mu.Unlock()
	list := l.streams[key]
	if i := slices.Index(list, sub); i >= 0 {
		list = slices.Delete(list, i, i+1)
	}
	if len(list) == 0 {
		delete(l.streams, key)
	} else {
		l.streams[key] = list
	}
}

// Keys is the number of keys with open streams.
func (l *Limits) Keys() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.streams)
}

// Count is the number of open streams of key.
func (l *Limits) Count(key string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.streams[key])
}

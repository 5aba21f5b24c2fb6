package registry

import (
	"strconv"
	"strings"
)

// Resume ids.
//
// With one id counter for a whole Redis (single server, Sentinel, Cluster
// without sharding), a resumable event's id is its number, the same for
// every stream, and it is written inside the frame.
//
// In sharded mode ids count per channel (each channel's counter lives on
// its own shard), so a stream on several channels resumes from a vector:
// its position on each channel. The id line then differs per stream and
// cannot be part of a frame shared by every stream: such a frame has
// NeedsID set, and the stream's writer appends its own id line (and the
// blank line that ends the event) from its Cursor. A stream on one channel
// keeps a plain number, its position on that channel.
//
// The vector is "v1" followed, for each channel whose position is known (in
// the order of the stream's channels), by "." + four characters naming the
// channel (base64url of 24 bits of a hash of its name) + the position in base
// 36. Its length is at most 2 + 18*n for n channels (13 base-36 digits hold
// any 64-bit number); ids are about the publish time in microseconds, ten
// base-36 digits, so 2 + 15*n in practice: 242 bytes for the default
// max_channels of 16, 962 for 64. A channel added to a stream since the id
// was issued starts at the present; one that left is ignored; two channels
// whose four characters collide are told apart by their order.

// EventID is a Last-Event-ID as a client sent it, parsed.
type EventID struct {
	raw     string
	valid   bool
	vector  bool
	n       uint64    // a plain number
	entries []idEntry // a vector
}

type idEntry struct {
	key string
	pos uint64
}

// maxIDLen bounds the Last-Event-ID read: longer is ignored (no resume).
// It holds the vector of 1,800 channels.
const maxIDLen = 32 << 10

// vectorPrefix starts a vector id.
const vectorPrefix = "v1"

// ParseEventID parses a Last-Event-ID: a plain number or a vector. Anything
// else is not one of ours, and is not Valid.
func ParseEventID(s string) EventID {
	s = strings.TrimSpace(s)
	id := EventID{raw: s}
	if s == "" || len(s) > maxIDLen {
		return id
	}
	if n, err := strconv.ParseUint(s, 10, 64); err == nil {
		id.valid, id.n = true, n
		return id
	}
	rest, ok := strings.CutPrefix(s, vectorPrefix)
	if !ok {
		return id
	}
	for rest != "" {
		if rest[0] != '.' {
			return id
		}
		rest = rest[1:]
		end := strings.IndexByte(rest, '.')
		if end < 0 {
			end = len(rest)
		}
		e := rest[:end]
		rest = rest[end:]
		if len(e) < 5 {
			return id
		}
		for i := 0; i < 4; i++ {
			if strings.IndexByte(keyAlphabet, e[i]) < 0 {
				return id
			}
		}
		pos, err := strconv.ParseUint(e[4:], 36, 64)
		if err != nil || e[4] == '+' || e[4] == '-' {
			return id
		}
		id.entries = append(id.entries, idEntry{key: e[:4], pos: pos})
	}
	id.valid, id.vector = true, true
	return id
}

// Valid reports whether the id is one of ours: a stream resumes from it.
func (id EventID) Valid() bool { return id.valid }

// String is the id as the client sent it (spaces trimmed).
func (id EventID) String() string { return id.raw }

// keyAlphabet is base64url, the characters of a channel's key in a vector.
const keyAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

// channelKey names a channel in a vector id: 24 bits of its FNV-1a hash.
func channelKey(channel string) string {
	h := uint32(2166136261)
	for i := 0; i < len(channel); i++ {
		h ^= uint32(channel[i])
		h *= 16777619
	}
	// Mix, so that names that differ in their last byte (room1, room2)
	// differ in every character of the key (murmur3's finalizer).
	h ^= h >> 16
	h *= 0x85ebca6b
	h ^= h >> 13
	h *= 0xc2b2ae35
	h ^= h >> 16
	return string([]byte{
		keyAlphabet[h>>18&63], keyAlphabet[h>>12&63], keyAlphabet[h>>6&63], keyAlphabet[h&63],
	})
}

// Cursor is where a stream is in its channels' events: what it has written,
// to skip what it would write twice (history replayed, then the same events
// live), and the id it tells its client. It belongs to the stream's writer:
// it is not safe for concurrent use.
type Cursor struct {
	channels []string
	resume   bool
	last     uint64     // one counter: the highest id written
	per      *positions // ids per channel (sharded mode); nil otherwise
}

// positions is a cursor's state where ids count per channel, apart so that
// the common cursor (one counter) stays a few words.
type positions struct {
	// The position on each channel, whether it is known, and whether
	// history must be replayed from it.
	pos     []uint64
	known   []bool
	resumed []bool
	keys    []string // channelKey of each channel, for vectors

	ids  []byte // AppendWire's scratch: the id lines it wrote
	wire []wireItem
}

type wireItem struct {
	f          *Frame
	start, end int // the frame's id line in ids
}

// Cursor returns the cursor of the stream s (attached) resuming from id (a
// zero EventID when it does not resume). With ids per channel, a channel
// the id does not name starts where its history stood when s was attached.
func (r *Registry) Cursor(s *Subscriber, id EventID) *Cursor {
	c := &Cursor{channels: s.channels}
	if r.perChannel == nil {
		if id.valid && !id.vector {
			c.last, c.resume = id.n, true
		}
		return c
	}
	n := len(s.channels)
	c.per = &positions{pos: make([]uint64, n), known: make([]bool, n), resumed: make([]bool, n), keys: make([]string, n)}
	for i, ch := range s.channels {
		c.per.keys[i] = channelKey(ch)
	}
	used := make([]bool, len(id.entries))
	for i := range s.channels {
		switch {
		case id.valid && !id.vector:
			c.per.pos[i], c.per.known[i], c.per.resumed[i] = id.n, true, true
		case id.vector:
			for j, e := range id.entries {
				if !used[j] && e.key == c.per.keys[i] {
					used[j] = true
					c.per.pos[i], c.per.known[i], c.per.resumed[i] = e.pos, true, true
					break
				}
			}
		}
		if st := s.start; !c.per.known[i] && st != nil && i < len(st.known) && st.known[i] {
			c.per.pos[i], c.per.known[i] = st.pos[i], true
		}
		c.resume = c.resume || c.per.resumed[i]
	}
	return c
}

// Resuming reports whether the stream replays history before live events.
func (c *Cursor) Resuming() bool { return c.resume }

// Advance moves the cursor past f and reports whether the stream writes
// it: false for a resumable event at or below the stream's position on its
// channel (written already, or older than the stream).
func (c *Cursor) Advance(f *Frame) bool {
	if f.Seq == 0 {
		return true
	}
	if c.per == nil {
		if f.Seq <= c.last {
			return false
		}
		c.last = f.Seq
		return true
	}
	for i, ch := range c.channels {
		if ch != f.Channel {
			continue
		}
		if c.per.known[i] && f.Seq <= c.per.pos[i] {
			return false
		}
		c.per.pos[i], c.per.known[i] = f.Seq, true
		return true
	}
	return true
}

// AppendID appends the stream's id line and the blank line that ends an
// event: what a frame with NeedsID lacks, written right after it (once
// Advance accepted it).
func (c *Cursor) AppendID(dst []byte) []byte {
	dst = append(dst, "id: "...)
	dst = c.appendID(dst)
	return append(dst, '\n', '\n')
}

// ID is the stream's resume id now ("" when it has none).
func (c *Cursor) ID() string { return string(c.appendID(nil)) }

func (c *Cursor) appendID(dst []byte) []byte {
	if c.per == nil {
		if c.last == 0 {
			return dst
		}
		return strconv.AppendUint(dst, c.last, 10)
	}
	if len(c.channels) == 1 {
		if !c.per.known[0] {
			return dst
		}
		return strconv.AppendUint(dst, c.per.pos[0], 10)
	}
	dst = append(dst, vectorPrefix...)
	for i := range c.channels {
		if c.per.known[i] {
			dst = append(dst, '.')
			dst = append(dst, c.per.keys[i]...)
			dst = strconv.AppendUint(dst, c.per.pos[i], 36)
		}
	}
	return dst
}

// AppendWire appends to bufs what the stream writes for frames, in order:
// each frame Advance accepts, with its id line when it NeedsID; a frame
// without bytes (a close alone) writes nothing. It returns the events and
// bytes it appended. The id lines live in the cursor until the next call:
// write bufs before calling again.
func (c *Cursor) AppendWire(bufs [][]byte, frames []*Frame) (out [][]byte, events, size int) {
	if c.per == nil {
		// One counter: every frame carries its own id, if any.
		for _, f := range frames {
			if c.Advance(f) && len(f.Bytes) > 0 {
				bufs = append(bufs, f.Bytes)
				events++
				size += len(f.Bytes)
			}
		}
		return bufs, events, size
	}
	c.per.ids = c.per.ids[:0]
	c.per.wire = c.per.wire[:0]
	for _, f := range frames {
		if !c.Advance(f) || len(f.Bytes) == 0 {
			continue
		}
		it := wireItem{f: f}
		if f.NeedsID {
			it.start = len(c.per.ids)
			c.per.ids = c.AppendID(c.per.ids)
			it.end = len(c.per.ids)
		}
		c.per.wire = append(c.per.wire, it)
	}
	for _, it := range c.per.wire {
		bufs = append(bufs, it.f.Bytes)
		size += len(it.f.Bytes)
		if it.end > it.start {
			bufs = append(bufs, c.per.ids[it.start:it.end])
			size += it.end - it.start
		}
	}
	clear(c.per.wire) // let the frames go
	return bufs, len(c.per.wire), size
}

// replayFrom is what ReplayPage reads from: the channels to replay and the
// position on each.
func (c *Cursor) replayFrom() (channels []string, after []uint64) {
	for i, ch := range c.channels {
		if c.per.resumed[i] {
			channels = append(channels, ch)
			after = append(after, c.per.pos[i])
		}
	}
	return channels, after
}

// Resumes reports whether a stream whose client sent id replays history
// before its live events (its Cursor will say the same): a plain number
// always, a vector only where ids count per channel.
func (r *Registry) Resumes(id EventID) bool {
	return id.valid && (!id.vector || r.perChannel != nil)
}

package broker

import "strings"

// In sharded mode (Options.Sharded) a channel's history and its resumable
// twin live in the channel's own hash slot, so that SPUBLISH, SSUBSCRIBE
// and the function that writes history all land on the shard that owns the
// channel. Redis hashes a name by its hash tag (what is between the first
// "{" and the first "}" after it, when that is not empty), else by the whole
// name, so the module's names for a channel c are:
//
//	c has a hash tag ("user:{42}"):    sse:h:<c>         sse:r:<c>
//	c has none and no "}" ("user:42"): sse:h{<c>}        sse:r{<c>}
//	c has none but a "}" ("a}b"):      sse:h~{<t>}<c>    sse:r~{<t>}<c>
//
// In the first form the prefix holds no "{", so the name inherits c's tag;
// in the second c itself is the tag. A name holding "}" without a tag
// cannot be a tag, so the third form uses a three-character tag t (printable
// ASCII, no "}") chosen to hash to c's slot (see slotTag). The three
// prefixes differ, so no two channels share a name, and a name gives its
// channel back (channelOfHistory, channelOfTwin). Every name starting with
// "sse:" is reserved for the module in sharded mode.
//
// A publisher names the history key in FCALL (it is what Redis routes by,
// and what a slot migration moves):
//
//	FCALL sse_publish 1 sse:h{user:42} <payload> [<maxlen> [<ttl_seconds>]]
//
// The function library computes the same names (and refuses a key that is
// not the channel's, naming the right one in its error).

// Prefixes of the sharded names.
const (
	shardedHistTagged = "sse:h:"  // + c, c has a hash tag
	shardedHistWrap   = "sse:h{"  // + c + "}"
	shardedHistSlot   = "sse:h~{" // + t + "}" + c
	shardedTwinTagged = "sse:r:"
	shardedTwinWrap   = "sse:r{"
	shardedTwinSlot   = "sse:r~{"
	// ShardedReservedPrefix starts every name the module owns in sharded
	// mode: channels may not start with it.
	ShardedReservedPrefix = "sse:"
)

// hashSlots is the number of slots of a Redis Cluster.
const hashSlots = 16384

// hasHashTag reports whether Redis hashes s by a hash tag rather than whole.
func hasHashTag(s string) bool {
	i := strings.IndexByte(s, '{')
	if i < 0 {
		return false
	}
	j := strings.IndexByte(s[i+1:], '}')
	return j > 0
}

// hashPart is the part of s that Redis hashes.
func hashPart(s string) string {
	if i := strings.IndexByte(s, '{'); i >= 0 {
		if j := strings.IndexByte(s[i+1:], '}'); j > 0 {
			return s[i+1 : i+1+j]
		}
	}
	return s
}

// Slot is the Redis Cluster hash slot of a key or channel name.
func Slot(name string) int { return int(crc16(hashPart(name)) % hashSlots) }

// ShardedHistoryKey is the key holding channel's history in sharded mode,
// the key a publisher names in FCALL sse_publish.
func ShardedHistoryKey(channel string) string {
	return shardedName(channel, shardedHistTagged, shardedHistWrap, shardedHistSlot)
}

// shardedTwin is channel's resumable twin in sharded mode.
func shardedTwin(channel string) string {
	return shardedName(channel, shardedTwinTagged, shardedTwinWrap, shardedTwinSlot)
}

func shardedName(c, tagged, wrap, slotted string) string {
	switch {
	case hasHashTag(c):
		return tagged + c
	case strings.IndexByte(c, '}') < 0:
		return wrap + c + "}"
	}
	return slotted + slotTag(Slot(c)) + "}" + c
}

// channelOfTwin is the channel whose sharded twin name is; ok is false
// when name is no twin.
func channelOfTwin(name string) (string, bool) {
	return channelOfSharded(name, shardedTwinTagged, shardedTwinWrap, shardedTwinSlot)
}

// channelOfSharded reverses shardedName, accepting only the one name a
// channel has.
func channelOfSharded(name, tagged, wrap, slotted string) (string, bool) {
	var c string
	switch {
	case strings.HasPrefix(name, tagged):
		c = name[len(tagged):]
	case strings.HasPrefix(name, wrap) && strings.HasSuffix(name, "}") && len(name) > len(wrap):
		c = name[len(wrap) : len(name)-1]
	case strings.HasPrefix(name, slotted):
		rest := name[len(slotted):]
		j := strings.IndexByte(rest, '}')
		if j < 0 {
			return "", false
		}
		c = rest[j+1:]
	default:
		return "", false
	}
	return c, c != "" && shardedName(c, tagged, wrap, slotted) == name
}

// slotTag is a hash tag of three printable ASCII characters, none of them
// "}", that hashes to slot: a character p, then two bytes that make the
// CRC come out right (CRC16 is linear: appending two bytes B to a string
// whose CRC register is s yields step16(s ^ B), and step16 is a bijection,
// so B = s ^ unstep16(target)). The first p (from "!" up) and the first of
// the four 16-bit targets of the slot whose bytes are printable win; the
// function library computes the same.
func slotTag(slot int) string {
	for p := byte('!'); p <= '~'; p++ {
		if p == '}' {
			continue
		}
		s := crc16(string([]byte{p}))
		for hi := 0; hi < 4; hi++ {
			b := s ^ unstep16(uint16(slot+hi*hashSlots))
			b1, b2 := byte(b>>8), byte(b)
			if tagByte(b1) && tagByte(b2) {
				return string([]byte{p, b1, b2})
			}
		}
	}
	panic("broker: no hash tag for slot") // unreachable: tested for every slot
}

func tagByte(b byte) bool { return b >= '!' && b <= '~' && b != '}' }

// unstep16 runs the CRC16 register back over 16 zero bits.
func unstep16(r uint16) uint16 {
	for range 16 {
		if r&1 != 0 {
			r = (r^0x1021)>>1 | 0x8000
		} else {
			r >>= 1
		}
	}
	return r
}

// crc16 is CRC-16/XMODEM, the hash of Redis Cluster's key slots.
func crc16(s string) uint16 {
	var crc uint16
	for i := 0; i < len(s); i++ {
		crc ^= uint16(s[i]) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return crc
}

package broker

import (
	"strings"
	"testing"
)

func TestSlotMatchesRedis(t *testing.T) {
	// Values from CLUSTER KEYSLOT on Redis 7.
	for name, want := range map[string]int{
		"foo": 12182, "bar": 5061, "{foo}bar": 12182, "a{}b": Slot("a{}b"),
		"{user1000}.following": 3443, "": 0,
	} {
		if got := Slot(name); got != want {
			t.Errorf("Slot(%q) = %d, want %d", name, got, want)
		}
	}
}

func TestSlotTagEverySlot(t *testing.T) {
	for slot := range hashSlots {
		tag := slotTag(slot)
		if len(tag) != 3 || strings.ContainsRune(tag, '}') {
			t.Fatalf("slot %d: tag %q", slot, tag)
		}
		for i := 0; i < len(tag); i++ {
			if tag[i] < '!' || tag[i] > '~' {
				t.Fatalf("slot %d: tag %q is not printable", slot, tag)
			}
		}
		if got := int(crc16(tag) % hashSlots); got != slot {
			t.Fatalf("slot %d: tag %q hashes to %d", slot, tag, got)
		}
	}
}

func TestShardedNames(t *testing.T) {
	for _, c := range []string{
		"user:42", "user:{42}", "{a}", "a", "a{b", "a}b", "a{}b", "}", "{}", "{}{x}",
		"x{y}z}", "sp ace", "ünï", "{sse}:h:x", strings.Repeat("k", 300),
	} {
		h, tw := ShardedHistoryKey(c), shardedTwin(c)
		if Slot(h) != Slot(c) || Slot(tw) != Slot(c) {
			t.Errorf("%q: history %q (slot %d) and twin %q (slot %d), channel slot %d",
				c, h, Slot(h), tw, Slot(tw), Slot(c))
		}
		if got, ok := channelOfTwin(tw); !ok || got != c {
			t.Errorf("channelOfTwin(%q) = %q, %v; want %q", tw, got, ok, c)
		}
		if got, ok := channelOfSharded(h, shardedHistTagged, shardedHistWrap, shardedHistSlot); !ok || got != c {
			t.Errorf("history %q gives back %q, %v; want %q", h, got, ok, c)
		}
		if !strings.HasPrefix(h, ShardedReservedPrefix) || !strings.HasPrefix(tw, ShardedReservedPrefix) {
			t.Errorf("%q: names %q %q outside the reserved prefix", c, h, tw)
		}
	}
	// Distinct channels never share a name, even where the simple
	// wrapping would collide ("{a}" has the tag a, "a" has none).
	if ShardedHistoryKey("{a}") == ShardedHistoryKey("a") {
		t.Fatal("{a} and a share a history key")
	}
	// Names that are no channel's.
	for _, n := range []string{"sse:r{a}b}", "sse:r{{x}}", "sse:r:abc", "sse:r~{zzz}a}b", "sse:r{}", "user:1", "sse:r~{"} {
		if c, ok := channelOfTwin(n); ok {
			t.Errorf("channelOfTwin(%q) = %q, want none", n, c)
		}
	}
}

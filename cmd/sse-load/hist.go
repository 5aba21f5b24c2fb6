package main

import (
	"math"
	"math/bits"
	"sync/atomic"
)

// histogram records non-negative values (microseconds) in log-linear
// buckets: values below histSub are exact, larger ones fall in buckets of
// relative width 1/histSub (under 0.8%). Record is lock-free, so every stream
// goroutine can record into one shared histogram.
type histogram struct {
	counts [histBuckets]atomic.Uint64
	n      atomic.Uint64
	sum    atomic.Uint64
	max    atomic.Uint64
}

const (
	histSubBits = 7
	histSub     = 1 << histSubBits // sub-buckets per power of two
	histBuckets = histSub + (64-histSubBits)*histSub
)

// bucketOf returns the bucket index of v.
func bucketOf(v uint64) int {
	if v < histSub {
		return int(v)
	}
	shift := bits.Len64(v) - histSubBits - 1 // v>>shift is in [histSub, 2*histSub)
	return histSub + shift*histSub + int(v>>uint(shift)) - histSub
}

// bucketRange returns the smallest and largest value of bucket i.
func bucketRange(i int) (lo, hi uint64) {
	if i < histSub {
		return uint64(i), uint64(i)
	}
	shift := (i - histSub) / histSub
	mant := uint64(histSub + (i-histSub)%histSub)
	lo = mant << uint(shift)
	hi = lo + (1 << uint(shift)) - 1
	return lo, hi
}

// Record adds one value.
func (h *histogram) Record(v uint64) {
	h.counts[bucketOf(v)].Add(1)
	h.n.Add(1)
	h.sum.Add(v)
	for {
		m := h.max.Load()
		if v <= m || h.max.CompareAndSwap(m, v) {
			return
		}
	}
}

// Count is the number of values recorded.
func (h *histogram) Count() uint64 { return h.n.Load() }

// Max is the largest value recorded (exact).
func (h *histogram) Max() uint64 { return h.max.Load() }

// Mean is the mean of the values recorded (exact).
func (h *histogram) Mean() float64 {
	n := h.n.Load()
	if n == 0 {
		return 0
	}
	return float64(h.sum.Load()) / float64(n)
}

// Percentile returns the value at or below which p percent of the values
// lie (nearest rank), as the middle of its bucket, never above Max. It is 0
// when nothing was recorded.
func (h *histogram) Percentile(p float64) uint64 {
	n := h.n.Load()
	if n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(p / 100 * float64(n)))
	if rank < 1 {
		rank = 1
	}
	if rank > n {
		rank = n
	}
	var seen uint64
	for i := range h.counts {
		seen += h.counts[i].Load()
		if seen >= rank {
			lo, hi := bucketRange(i)
			v := lo + (hi-lo)/2
			if m := h.max.Load(); v > m {
				v = m
			}
			return v
		}
	}
	return h.max.Load()
}

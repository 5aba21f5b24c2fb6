package sse

import "strings"

// faultNames are the metric labels of the faults, in bit order.
var faultNames = [...]string{"bad_envelope", "unsafe_field", "invalid_utf8"}

// faultMask holds every fault bit defined.
const faultMask = FaultBadEnvelope | FaultUnsafeField | FaultInvalidUTF8

// reasonSets holds the answer of Reasons for every set of faults, built once
// so that counting faults on the hot path never allocates.
var reasonSets = func() (sets [faultMask + 1][]string) {
	for f := range sets {
		for i, name := range faultNames {
			if f&(1<<i) != 0 {
				sets[f] = append(sets[f], name)
			}
		}
	}
	return sets
}()

// Reasons returns the metric label of every fault in f ("bad_envelope",
// "unsafe_field", "invalid_utf8"), in that order, or nil for no fault. The
// slice is shared: callers must not modify it. It does not allocate.
// (FaultBadEnvelope|FaultUnsafeField|FaultInvalidUTF8).Reasons() lists every
// label, for initialising counters.
func (f Fault) Reasons() []string {
	return reasonSets[f&faultMask]
}

// String joins the reasons of f with "|", or returns "none"; it is meant for
// logs.
func (f Fault) String() string {
	if f&faultMask == 0 {
		return "none"
	}
	return strings.Join(f.Reasons(), "|")
}

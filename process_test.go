package caddysse

import "testing"

// freshProcess gives the test a process state of its own (no hub, no
// count, counters at zero), and puts the previous one back after it. The
// test must load no config that outlives it.
func freshProcess(t *testing.T) {
	t.Helper()
	prev := current.Swap(newProcess())
	t.Cleanup(func() {
		if n := proc().limits.Keys(); n != 0 {
			t.Errorf("%d max_connections_per keys still counted at the end of the test", n)
		}
		proc().hubs.Range(func(key, _ any) bool {
			t.Errorf("a hub is still in use at the end of the test: %v", describeHubKey(key))
			return true
		})
		current.Store(prev)
	})
}

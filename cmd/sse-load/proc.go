package main

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat:
// 100 on every Linux architecture Go runs on.
const clockTicks = 100

// procSample is the CPU time and resident memory of a group of processes.
type procSample struct {
	cpu float64 // seconds of user + system time
	rss int64   // KiB
	err error   // the first process that could not be read
}

// sampleProcs reads /proc/<pid>/stat and /proc/<pid>/status of each pid and
// sums them.
func sampleProcs(pids []int) procSample {
	var s procSample
	for _, pid := range pids {
		cpu, err := procCPU(pid)
		if err != nil {
			if s.err == nil {
				s.err = err
			}
			continue
		}
		rss, err := procRSS(pid)
		if err != nil {
			if s.err == nil {
				s.err = err
			}
			continue
		}
		s.cpu += cpu
		s.rss += rss
	}
	return s
}

// procCPU returns the user + system CPU seconds of pid (all its threads).
func procCPU(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStatCPU(b)
}

// parseStatCPU reads utime and stime (fields 14 and 15) of a /proc/<pid>/stat
// line. The command name (field 2) may hold spaces and parentheses, so the
// fields are counted from its closing parenthesis.
func parseStatCPU(b []byte) (float64, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("stat: no command name")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state): utime is field 14, stime field 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("stat: %d fields", len(f))
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("stat: bad utime or stime")
	}
	return float64(ut+st) / clockTicks, nil
}

// procRSS returns the resident set size of pid in KiB.
func procRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	return parseStatusRSS(b)
}

// parseStatusRSS reads VmRSS from /proc/<pid>/status.
func parseStatusRSS(b []byte) (int64, error) {
	for _, line := range bytes.Split(b, []byte("\n")) {
		v, ok := bytes.CutPrefix(line, []byte("VmRSS:"))
		if !ok {
			continue
		}
		f := strings.Fields(string(v))
		if len(f) == 0 {
			break
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("status: bad VmRSS")
		}
		return n, nil
	}
	return 0, fmt.Errorf("status: no VmRSS")
}

// raiseNofile raises the soft RLIMIT_NOFILE to the hard limit and returns
// both values, so that the tool can hold as many streams as the machine
// lets one process.
func raiseNofile() (soft, hard uint64, err error) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0, 0, err
	}
	if rl.Cur < rl.Max {
		rl.Cur = rl.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
			return 0, 0, err
		}
	}
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0, 0, err
	}
	return rl.Cur, rl.Max, nil
}

// parsePids reads "12,34" into pids.
func parsePids(s string) ([]int, error) {
	var pids []int
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' }) {
		n, err := strconv.Atoi(f)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("bad pid %q", f)
		}
		pids = append(pids, n)
	}
	return pids, nil
}

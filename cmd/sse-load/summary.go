package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
)

// chartPanels are the blocks of the chart data, in the order bench/chart.gp
// plots them (one gnuplot index each).
var chartPanels = []struct {
	scenario, title string
	value           func(r *report) float64
}{
	{"fanout", "fan-out: server CPU per delivered event (us)", func(r *report) float64 { return r.CPUTotalUs }},
	{"fanout", "fan-out: p99 latency (ms)", func(r *report) float64 { return r.LatP99 }},
	{"fanout-light", "light fan-out: server CPU per delivered event (us)", func(r *report) float64 { return r.CPUTotalUs }},
	{"fanout-light", "light fan-out: p99 latency (ms)", func(r *report) float64 { return r.LatP99 }},
	{"unicast", "unicast: server CPU per delivered event (us)", func(r *report) float64 { return r.CPUTotalUs }},
	{"unicast", "unicast: p99 latency (ms)", func(r *report) float64 { return r.LatP99 }},
	{"idle", "idle: RSS per open stream (KiB)", func(r *report) float64 { return r.RSSPerStream }},
	{"connect", "connect rate (connects/s)", func(r *report) float64 { return r.ConnectsPerS }},
	{"h2-fanout", "HTTPS + HTTP/2 fan-out: server CPU per delivered event (us)", func(r *report) float64 { return r.CPUServerUs }},
	{"h2-idle", "HTTPS + HTTP/2 idle: RSS per open stream (KiB)", func(r *report) float64 { return r.RSSPerStream }},
}

// runSummary reads JSON lines of reports and writes the Markdown tables
// (medians, ratios to the baseline labels, the HTTPS + HTTP/2 table,
// targets, every run) and the chart data.
// baselines is a comma-separated list of labels: each gets a table of
// ratios, and the HTTPS + HTTP/2 table has ratios to those that ran there.
func runSummary(in, mdOut, datOut, baselines string) error {
	reps, err := readReports(in)
	if err != nil {
		return err
	}
	var md io.Writer = os.Stdout
	if mdOut != "" {
		f, err := os.Create(mdOut)
		if err != nil {
			return err
		}
		defer f.Close()
		md = f
	}
	groups := groupReports(reps)
	var bases []string
	for _, b := range strings.Split(baselines, ",") {
		if b = strings.TrimSpace(b); b != "" {
			bases = append(bases, b)
		}
	}
	writeMarkdown(md, groups, bases)
	if datOut != "" {
		var b bytes.Buffer
		writeChartData(&b, groups)
		if err := os.WriteFile(datOut, b.Bytes(), 0o644); err != nil {
			return err
		}
	}
	return nil
}

func readReports(path string) ([]*report, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var reps []*report
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for line := 1; sc.Scan(); line++ {
		b := bytes.TrimSpace(sc.Bytes())
		if len(b) == 0 || b[0] != '{' {
			continue
		}
		r := new(report)
		if err := json.Unmarshal(b, r); err != nil {
			return nil, fmt.Errorf("%s:%d: %w", path, line, err)
		}
		reps = append(reps, r)
	}
	return reps, sc.Err()
}

// group is the runs of one scenario against one server.
type group struct {
	name, label string
	runs        []*report
	med         report // medians of the numeric fields that the tables use
}

// groupReports groups by scenario then label, in order of first appearance.
func groupReports(reps []*report) []*group {
	var groups []*group
	find := func(name, label string) *group {
		for _, g := range groups {
			if g.name == name && g.label == label {
				return g
			}
		}
		g := &group{name: name, label: label}
		groups = append(groups, g)
		return g
	}
	for _, r := range reps {
		g := find(r.Name, r.Label)
		g.runs = append(g.runs, r)
	}
	// Keep each scenario's groups together.
	var order []string
	for _, g := range groups {
		if !slices.Contains(order, g.name) {
			order = append(order, g.name)
		}
	}
	slices.SortStableFunc(groups, func(a, b *group) int {
		return slices.Index(order, a.name) - slices.Index(order, b.name)
	})
	for _, g := range groups {
		g.med = medianReport(g.runs)
	}
	return groups
}

// medianReport returns a report whose numeric fields are the medians of
// those of runs.
func medianReport(runs []*report) report {
	m := func(f func(r *report) float64) float64 {
		v := make([]float64, len(runs))
		for i, r := range runs {
			v[i] = f(r)
		}
		return median(v)
	}
	return report{
		Streams:      int(m(func(r *report) float64 { return float64(r.Streams) })),
		Connected:    int64(m(func(r *report) float64 { return float64(r.Connected) })),
		Expected:     int64(m(func(r *report) float64 { return float64(r.Expected) })),
		Delivered:    int64(m(func(r *report) float64 { return float64(r.Delivered) })),
		LatP50:       m(func(r *report) float64 { return r.LatP50 }),
		LatP90:       m(func(r *report) float64 { return r.LatP90 }),
		LatP99:       m(func(r *report) float64 { return r.LatP99 }),
		LatMax:       m(func(r *report) float64 { return r.LatMax }),
		CPUTotalUs:   m(func(r *report) float64 { return r.CPUTotalUs }),
		CPUServerUs:  m(func(r *report) float64 { return r.CPUServerUs }),
		CPURedisUs:   m(func(r *report) float64 { return r.CPURedisUs }),
		RSSPerStream: m(func(r *report) float64 { return r.RSSPerStream }),
		RSSServerPer: m(func(r *report) float64 { return r.RSSServerPer }),
		RSSRedisPer:  m(func(r *report) float64 { return r.RSSRedisPer }),
		ConnectsPerS: m(func(r *report) float64 { return r.ConnectsPerS }),
		Mode:         runs[0].Mode,
	}
}

// median of v (the mean of the two middle values for an even count).
func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func writeMarkdown(w io.Writer, groups []*group, baselines []string) {
	fmt.Fprintln(w, "Medians per scenario and server. CPU is server + Redis (server / Redis in brackets), per delivered event, or per connect for `connect`; RSS per open stream is the growth of server + Redis from before the streams to after them, divided by the streams.")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| scenario | server | runs | streams | delivered / expected | p50 ms | p90 ms | p99 ms | max ms | CPU us / event | RSS KiB / stream | connects/s |")
	fmt.Fprintln(w, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
	for _, g := range groups {
		m := &g.med
		streams, delivered, cpu, rss, conn := "", "", "", "", ""
		if m.Mode != "connect" {
			streams = fmt.Sprintf("%d / %d", m.Connected, m.Streams)
			rss = fmt.Sprintf("%.1f (%.1f / %.1f)", m.RSSPerStream, m.RSSServerPer, m.RSSRedisPer)
		}
		if m.Mode == "fanout" || m.Mode == "unicast" {
			delivered = fmt.Sprintf("%d / %d", m.Delivered, m.Expected)
		}
		if m.Mode != "idle" {
			cpu = fmt.Sprintf("%.1f (%.1f / %.1f)", m.CPUTotalUs, m.CPUServerUs, m.CPURedisUs)
		}
		lat := [4]string{}
		if m.Mode != "idle" {
			lat = [4]string{f2(m.LatP50), f2(m.LatP90), f2(m.LatP99), f2(m.LatMax)}
		}
		if m.Mode == "connect" {
			conn = fmt.Sprintf("%.0f", m.ConnectsPerS)
		}
		fmt.Fprintf(w, "| %s | %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
			g.name, g.label, len(g.runs), streams, delivered, lat[0], lat[1], lat[2], lat[3], cpu, rss, conn)
	}

	for _, b := range baselines {
		writeRatios(w, groups, b)
	}
	writeH2(w, groups, baselines)
	writeTargets(w, groups)

	fmt.Fprintln(w)
	fmt.Fprintln(w, "Every run (CPU s is server + Redis over the measured phase).")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| scenario | server | run | streams | delivered / expected | p50 ms | p90 ms | p99 ms | max ms | CPU s | CPU us / event | server CPU us / event | RSS KiB / stream | connects/s | notes |")
	fmt.Fprintln(w, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|")
	for _, g := range groups {
		for _, r := range g.runs {
			streams, delivered, cpu, scpu, rss, conn := "", "", "", "", "", ""
			if r.Mode != "connect" {
				streams = fmt.Sprintf("%d / %d", r.Connected, r.Streams)
				rss = fmt.Sprintf("%.1f", r.RSSPerStream)
			}
			if r.Mode == "fanout" || r.Mode == "unicast" {
				delivered = fmt.Sprintf("%d / %d", r.Delivered, r.Expected)
			}
			if r.Mode != "idle" {
				cpu = fmt.Sprintf("%.1f", r.CPUTotalUs)
				scpu = fmt.Sprintf("%.1f", r.CPUServerUs)
			}
			if r.Mode == "connect" {
				conn = fmt.Sprintf("%.0f", r.ConnectsPerS)
			}
			lat := [4]string{}
			if r.Mode != "idle" {
				lat = [4]string{f2(r.LatP50), f2(r.LatP90), f2(r.LatP99), f2(r.LatMax)}
			}
			notes := strings.Join(r.Errors, "; ")
			if r.Lost > 0 {
				notes = strings.TrimPrefix(notes+fmt.Sprintf("; %d streams lost", r.Lost), "; ")
			}
			notes = strings.ReplaceAll(notes, "|", "/")
			fmt.Fprintf(w, "| %s | %s | %d | %s | %s | %s | %s | %s | %s | %.2f | %s | %s | %s | %s | %s |\n",
				g.name, g.label, r.Run, streams, delivered, lat[0], lat[1], lat[2], lat[3], r.CPUTotal, cpu, scpu, rss, conn, notes)
		}
	}
}

// find returns the group of a scenario and label, or nil.
func find(groups []*group, name, label string) *group {
	for _, g := range groups {
		if g.name == name && g.label == label {
			return g
		}
	}
	return nil
}

// writeRatios writes the ratios of every group's medians to those of the
// baseline label in the same scenario, if the baseline ran at all.
func writeRatios(w io.Writer, groups []*group, baseline string) {
	if !slices.ContainsFunc(groups, func(g *group) bool { return g.label == baseline }) {
		return
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "Ratios of medians to %s (below 1: less than %s; for connects/s above 1 is better).\n\n", baseline, baseline)
	fmt.Fprintln(w, "| scenario | server | CPU / event | server CPU / event | p99 latency | RSS / stream | connects/s |")
	fmt.Fprintln(w, "|---|---|--:|--:|--:|--:|--:|")
	for _, g := range groups {
		if g.label == baseline {
			continue
		}
		base := find(groups, g.name, baseline)
		if base == nil {
			continue
		}
		m, b := &g.med, &base.med
		cpu, scpu, lat, rss, conn := "", "", "", "", ""
		if m.Mode != "idle" {
			cpu, scpu, lat = ratio(m.CPUTotalUs, b.CPUTotalUs), ratio(m.CPUServerUs, b.CPUServerUs), ratio(m.LatP99, b.LatP99)
		}
		if m.Mode != "connect" {
			rss = ratio(m.RSSPerStream, b.RSSPerStream)
		} else {
			conn = ratio(m.ConnectsPerS, b.ConnectsPerS)
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s |\n", g.name, g.label, cpu, scpu, lat, rss, conn)
	}
}

// writeH2 writes the table of the scenarios run over HTTPS + HTTP/2: server
// CPU per delivered event (Redis apart: the publishers differ) and RSS per
// stream, each with its ratios to the baselines that ran in that scenario.
func writeH2(w io.Writer, groups []*group, baselines []string) {
	var h2 []*group
	var bases []string
	for _, g := range groups {
		if g.runs[0].Proto != protoH2 {
			continue
		}
		h2 = append(h2, g)
		if slices.Contains(baselines, g.label) && !slices.Contains(bases, g.label) {
			bases = append(bases, g.label)
		}
	}
	if len(h2) == 0 {
		return
	}
	// The floors first, then the others (Nchan) in the order given.
	slices.SortStableFunc(bases, func(a, b string) int {
		return boolInt(!strings.Contains(a, "floor")) - boolInt(!strings.Contains(b, "floor"))
	})
	fmt.Fprintln(w)
	fmt.Fprintln(w, "HTTPS + HTTP/2, one TLS connection per stream (medians). CPU is the server's alone, per delivered event; RSS per stream is the server's and Redis's growth.")
	fmt.Fprintln(w)
	hdr, sep := "| scenario | server | runs | streams | delivered / expected | p99 ms | server CPU us / event |", "|---|---|--:|--:|--:|--:|--:|"
	for _, b := range bases {
		hdr, sep = hdr+" vs "+b+" |", sep+"--:|"
	}
	hdr, sep = hdr+" RSS KiB / stream |", sep+"--:|"
	for _, b := range bases {
		hdr, sep = hdr+" vs "+b+" |", sep+"--:|"
	}
	fmt.Fprintln(w, hdr)
	fmt.Fprintln(w, sep)
	for _, g := range h2 {
		m := &g.med
		streams := fmt.Sprintf("%d / %d", m.Connected, m.Streams)
		delivered, p99, cpu := "", "", ""
		cpuR, rssR := "", ""
		for _, b := range bases {
			base := find(groups, g.name, b)
			r1, r2 := "", ""
			if base != nil && base != g {
				if m.Mode != "idle" {
					r1 = ratio(m.CPUServerUs, base.med.CPUServerUs)
				}
				r2 = ratio(m.RSSPerStream, base.med.RSSPerStream)
			}
			cpuR, rssR = cpuR+" "+r1+" |", rssR+" "+r2+" |"
		}
		if m.Mode != "idle" {
			delivered, p99, cpu = fmt.Sprintf("%d / %d", m.Delivered, m.Expected), f2(m.LatP99), fmt.Sprintf("%.1f", m.CPUServerUs)
		}
		fmt.Fprintf(w, "| %s | %s | %d | %s | %s | %s | %s |%s %.1f |%s\n",
			g.name, g.label, len(g.runs), streams, delivered, p99, cpu, cpuR, m.RSSPerStream, rssR)
	}
}

// targets are what issue 12 (and, marked, the earlier comparison) asks of
// caddy-sse, as ratios of medians to a baseline in the same scenario.
var targets = []struct {
	scenario, measure, baseline string
	labels                      []string
	limit                       float64
	text                        string
}{
	{"fanout", "cpu", "floor", []string{"caddy-sse", "caddy-sse/http"}, 1.10, "fan-out CPU per delivered event (server + Redis) <= 1.10x floor"},
	{"fanout-light", "cpu", "floor", []string{"caddy-sse"}, 1.10, "light fan-out (below saturation) CPU per delivered event (server + Redis) <= 1.10x floor"},
	{"fanout", "p99", "nchan", []string{"caddy-sse", "caddy-sse/http"}, 0.7, "fan-out p99 latency <= 0.7x Nchan"},
	{"idle", "rss", "floor", []string{"caddy-sse/log", "caddy-sse"}, 2.0, "idle RSS per open stream <= 2.0x floor"},
	{"h2-idle", "rss", "go-floor", []string{"caddy-sse"}, 1.15, "HTTPS + HTTP/2: idle RSS per stream <= 1.15x Go's floor"},
	{"h2-fanout", "cpu-server", "go-floor", []string{"caddy-sse"}, 1.15, "HTTPS + HTTP/2: fan-out server CPU per delivered event <= 1.15x Go's floor"},
	{"fanout", "cpu", "nchan", []string{"caddy-sse", "caddy-sse/http"}, 0.5, "(earlier) fan-out CPU per delivered event <= 0.5x Nchan"},
	{"idle", "rss", "nchan", []string{"caddy-sse"}, 1.0, "(earlier) idle RSS per open stream <= 1x Nchan"},
}

func measure(r *report, what string) float64 {
	switch what {
	case "cpu":
		return r.CPUTotalUs
	case "cpu-server":
		return r.CPUServerUs
	case "p99":
		return r.LatP99
	}
	return r.RSSPerStream
}

// writeTargets checks the targets whose groups ran, and that every event
// reached every stream of the largest fan-out (a scenario named
// fanout-<streams>).
func writeTargets(w io.Writer, groups []*group) {
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Targets (ratios of medians).")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| server | target | measured | met |")
	fmt.Fprintln(w, "|---|---|--:|---|")
	for _, t := range targets {
		b := find(groups, t.scenario, t.baseline)
		for _, l := range t.labels {
			g := find(groups, t.scenario, l)
			if g == nil || b == nil {
				continue
			}
			v, base := measure(&g.med, t.measure), measure(&b.med, t.measure)
			if base <= 0 {
				continue
			}
			fmt.Fprintf(w, "| %s | %s | %.2fx | %s |\n", l, t.text, v/base, yesNo(v <= t.limit*base))
		}
	}
	big := ""
	for _, g := range groups {
		if strings.HasPrefix(g.name, "fanout-") && g.name != "fanout-light" && g.med.Streams > 0 {
			if b := find(groups, big, g.label); b == nil || g.med.Streams > b.med.Streams {
				big = g.name
			}
		}
	}
	for _, g := range groups {
		if g.name != big || !strings.HasPrefix(g.label, "caddy-sse") {
			continue
		}
		m := &g.med
		ok := m.Connected == int64(m.Streams) && m.Delivered == m.Expected && m.Expected > 0
		fmt.Fprintf(w, "| %s | %d streams in one process all receive a broadcast | %d / %d streams, %d / %d events | %s |\n",
			g.label, m.Streams, m.Connected, m.Streams, m.Delivered, m.Expected, yesNo(ok))
	}
}

func f2(v float64) string { return fmt.Sprintf("%.2f", v) }

func ratio(a, b float64) string {
	if b == 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.2fx", a/b)
}

// writeChartData writes one gnuplot data block per chart panel: a quoted
// label and the median per server. Blocks are separated by two blank lines
// so that `index N` selects one.
func writeChartData(w io.Writer, groups []*group) {
	for i, p := range chartPanels {
		if i > 0 {
			fmt.Fprint(w, "\n\n")
		}
		fmt.Fprintf(w, "# %d: %s\n", i, p.title)
		n := 0
		for _, g := range groups {
			if g.name != p.scenario {
				continue
			}
			v := make([]float64, len(g.runs))
			for j, r := range g.runs {
				v[j] = p.value(r)
			}
			fmt.Fprintf(w, "%q %g\n", g.label, median(v))
			n++
		}
		if n == 0 {
			fmt.Fprintf(w, "%q 0\n", "none")
		}
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

func yesNo(ok bool) string {
	if ok {
		return "yes"
	}
	return "**no**"
}

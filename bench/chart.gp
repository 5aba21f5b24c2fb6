# Chart of bench/compare.sh: one panel per measure, one bar per server, each
# server in its own colour.
# Usage: gnuplot -e "dat='bench/results/chart.dat'; out='bench/results/compare.png'" bench/chart.gp
# The data file has one block per panel, in the order of the titles below
# (written by `sse-load -summarize -dat`): a quoted server name and a median.
set terminal pngcairo size 2200,860 font ",11"
set output out
set style fill solid 0.85 border -1
set boxwidth 0.6
set yrange [0:*]
set offsets 0.3, 0.3, graph 0.12, 0
set grid ytics
set xtics nomirror scale 0 rotate by -20
unset key
set linetype 1 lc rgb "#1f6fb2"
set linetype 2 lc rgb "#d9822b"
set linetype 3 lc rgb "#5aa469"
set linetype 4 lc rgb "#7f7f7f"
set linetype 5 lc rgb "#8c5bb5"
set linetype 6 lc rgb "#b0b0b0"
set linetype 7 lc rgb "#c94c4c"
colour(s) = s eq "caddy-sse" ? 1 : s eq "nchan" ? 2 : s eq "caddy-sse/http" ? 3 : s eq "floor" ? 4 : \
	s eq "caddy-sse/log" ? 5 : s eq "go-floor" ? 6 : 7
set multiplot layout 2,5 title "caddy-sse vs Nginx + Nchan and the floors (medians; lower is better but for connects/s)" font ",14"
titles = "'fan-out: server+Redis CPU per event (us)' 'fan-out: p99 latency (ms)' 'light fan-out: CPU per event (us)' 'light fan-out: p99 latency (ms)' 'unicast: server+Redis CPU per event (us)' 'unicast: p99 latency (ms)' 'idle: RSS per open stream (KiB)' 'connects per second' 'HTTPS+HTTP/2 fan-out: server CPU per event (us)' 'HTTPS+HTTP/2 idle: RSS per stream (KiB)'"
do for [i=0:9] {
	set title word(titles, i+1)
	plot dat index i using 0:2:(colour(strcol(1))):xtic(1) with boxes lc variable, \
	     '' index i using 0:2:(sprintf($2 >= 1000 ? "%.0f" : "%.3g", $2)) with labels offset 0,0.8
}
unset multiplot

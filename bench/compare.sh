#!/usr/bin/env bash
# caddy-sse against Nginx + Nchan and the floors, side by side, on this
# machine.
#
# Contenders: caddy-sse (bench/Caddyfile; caddy-sse/http publishes through
# sse_publish; caddy-sse/log is bench/Caddyfile.prod, with the site's access
# log and metrics on), Nginx + Nchan (bench/nginx-nchan.conf.in), the
# physical floor (the `floor` server of $FLOOR_DIR: one write(2) per
# subscriber per message, no HTTP server; skipped when FLOOR_DIR is unset),
# and for the HTTPS + HTTP/2 workload Go's own floor (bench/h2floor, the
# least a net/http server does: label go-floor).
#
# Installs what it needs if missing (redis-server, nginx, libnginx-mod-nchan,
# gnuplot-nox, openssl, curl, python3; Debian, as root), builds caddy,
# sse-load, h2floor and the floor, and for each round and workload starts a
# fresh redis-server and a fresh server on free loopback ports, runs
# cmd/sse-load against it and stops both. Rounds alternate the order of the
# servers. Then bench/burst.sh. Writes into bench/results/: runs.jsonl (one
# JSON line per run), runs.log (the tool's tables), results.md (medians,
# ratios to Nchan, the floor and Go's floor, the HTTPS + HTTP/2 table,
# targets, every run, the burst check), chart.dat and compare.png, burst.md
# and burst.jsonl, the pprof top lists of caddy (pprof-cpu-fanout.txt,
# pprof-heap.txt, pprof-h2.txt); and puts results.md into BENCHMARKS.md
# between its results markers.
#
# Usage: FLOOR_DIR=<path of the floor's source> bash bench/compare.sh
#        (about 15 minutes on 2 cores)
# Knobs (environment): ROUNDS (3), QUICK=1 (small workloads, to try the
# script), PROFILE=0 (skip the pprof runs), BIG=0 (skip the 18,000 streams),
# HTTP_PUB=0 (skip caddy-sse with sse_publish), H2=0 (skip the HTTPS +
# HTTP/2 workload), LOGGED=0 (skip caddy-sse/log), BURST=0 (skip the burst
# check), FLOOR_DIR (the floor's source directory), OUT (bench/results),
# SCENARIOS (only these, e.g. "fanout fanout-light"; default all).
#
# Fairness: every server may use both cores (caddy and the Go servers:
# GOMAXPROCS = 2, the Go default here; nginx: worker_processes auto = 2),
# and so may their Redis and the load tool, which is the same for all. A
# single nginx worker would cap Nchan at one core while the Go runtime uses
# two.
set -euo pipefail

cd "$(dirname "$0")/.."
LOG_NAME=compare
ROUNDS=${ROUNDS:-3}
QUICK=${QUICK:-0}
PROFILE=${PROFILE:-1}
BIG=${BIG:-1}
HTTP_PUB=${HTTP_PUB:-1}
H2=${H2:-1}
LOGGED=${LOGGED:-1}
BURST=${BURST:-1}
FLOOR_DIR=${FLOOR_DIR:-}
OUT=${OUT:-bench/results}
SCENARIOS=${SCENARIOS:-}
NGINX_WORKERS=${NGINX_WORKERS:-auto}
# shellcheck source=bench/lib.sh
. bench/lib.sh

# Workloads.
FANOUT_STREAMS=5000 FANOUT_EVENTS=40 FANOUT_RATE=20
# The same streams at a tenth of the rate: below saturation of this machine.
LIGHT_EVENTS=20 LIGHT_RATE=2
UNICAST_STREAMS=5000 UNICAST_EVENTS=10000 UNICAST_RATE=2000
IDLE_STREAMS=8000 IDLE_SETTLE=5s
CONNECT_SECONDS=10s
BIG_STREAMS=18000 BIG_EVENTS=10 BIG_RATE=5
# HTTPS + HTTP/2, one TLS connection per stream.
H2_STREAMS=3000 H2_EVENTS=20 H2_RATE=5 H2_SETTLE=5s
if [ "$QUICK" = 1 ]; then
	FANOUT_STREAMS=500 UNICAST_STREAMS=500 UNICAST_EVENTS=1000 UNICAST_RATE=500
	IDLE_STREAMS=800 IDLE_SETTLE=2s CONNECT_SECONDS=2s BIG_STREAMS=2000
	H2_STREAMS=300 H2_SETTLE=2s
fi

# --- What the benchmark needs ---------------------------------------------

nchan_module() {
	local dir
	dir=$(nginx -V 2>&1 | sed -n 's/.*--modules-path=\([^ ]*\).*/\1/p')
	echo "${dir:-/usr/lib/nginx/modules}/ngx_nchan_module.so"
}

install_missing() {
	local pkgs=()
	command -v redis-server >/dev/null || pkgs+=(redis-server)
	command -v redis-cli >/dev/null || pkgs+=(redis-tools)
	command -v nginx >/dev/null || pkgs+=(nginx)
	{ command -v nginx >/dev/null && [ -e "$(nchan_module)" ]; } || pkgs+=(libnginx-mod-nchan)
	command -v gnuplot >/dev/null || pkgs+=(gnuplot-nox)
	command -v ss >/dev/null || pkgs+=(iproute2)
	command -v openssl >/dev/null || pkgs+=(openssl)
	command -v curl >/dev/null || pkgs+=(curl)
	command -v python3 >/dev/null || pkgs+=(python3)
	apt_install "${pkgs[@]}"
}

install_missing
for tool in redis-server nginx gnuplot go ss curl openssl python3; do
	command -v "$tool" >/dev/null || { log "missing $tool"; exit 1; }
done
[ -e "$(nchan_module)" ] || { log "the Nchan module is not at $(nchan_module)"; exit 1; }

WORK=$(mktemp -d -t sse-bench.XXXXXX)
PIDS=()
cleanup() {
	local pid
	for pid in "${PIDS[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	wait 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT

log "building caddy, sse-load and h2floor"
go build -o "$WORK/caddy" ./cmd/caddy
go build -o "$WORK/sse-load" ./cmd/sse-load
go build -o "$WORK/h2floor" ./bench/h2floor
CADDY=$WORK/caddy
# The physical floor is built where it lives, never copied into the repo.
FLOOR=""
if [ -n "$FLOOR_DIR" ]; then
	log "building the floor in $FLOOR_DIR"
	(cd "$FLOOR_DIR" && go build -o "$WORK/floor" .)
	FLOOR=$WORK/floor
else
	log "FLOOR_DIR is not set: the floor contender is skipped"
fi
# Nchan's certificate for HTTPS: self-signed, ECDSA P-256 (the key type of
# Caddy's internal CA and of h2floor's certificate).
mkdir -p "$WORK/tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
	-subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
	-keyout "$WORK/tls/key.pem" -out "$WORK/tls/cert.pem" 2>"$WORK/tls/openssl.log"
mkdir -p "$OUT"
: >"$OUT/runs.jsonl"
: >"$OUT/runs.log"

# --- Processes --------------------------------------------------------------

start_caddy() {
	free_port CADDY_PORT
	free_port ADMIN_PORT
	CADDY_PORT=$CADDY_PORT ADMIN_PORT=$ADMIN_PORT REDIS_PORT=$REDIS_PORT \
		XDG_DATA_HOME="$WORK/xdg" XDG_CONFIG_HOME="$WORK/xdg" \
		"$WORK/caddy" run --config bench/Caddyfile --adapter caddyfile >>"$WORK/caddy.log" 2>&1 &
	SERVER_PID=$!
	PIDS+=("$SERVER_PID")
	SERVER_PIDS=$SERVER_PID
	wait_port "$CADDY_PORT"
	SUB="http://127.0.0.1:$CADDY_PORT/sub/{ch}"
}

# start_nchan [tls]: nginx + Nchan; with tls, its server listens with
# `ssl http2` (SUB is https://) and publishing goes to a plain listener.
start_nchan() {
	local tls=${1:-} opts="" conf=""
	free_port NCHAN_PORT
	NCHAN_PUB_PORT=$NCHAN_PORT
	if [ "$tls" = tls ]; then
		free_port NCHAN_PUB_PORT
		opts=" ssl http2"
		conf="ssl_certificate $WORK/tls/cert.pem; ssl_certificate_key $WORK/tls/key.pem;"
		conf="$conf ssl_protocols TLSv1.2 TLSv1.3; listen 127.0.0.1:$NCHAN_PUB_PORT backlog=4096;"
	fi
	mkdir -p "$WORK/nginx"
	sed -e "s|@NCHAN_MODULE@|$(nchan_module)|" -e "s|@WORKERS@|$NGINX_WORKERS|" \
		-e "s|@DIR@|$WORK/nginx|g" -e "s|@REDIS_PORT@|$REDIS_PORT|" -e "s|@PORT@|$NCHAN_PORT|" \
		-e "s|@LISTEN_OPTS@|$opts|" -e "s|@TLS@|$conf|" \
		bench/nginx-nchan.conf.in >"$WORK/nginx/nginx.conf"
	nginx -p "$WORK/nginx/" -e "$WORK/nginx/error.log" -c "$WORK/nginx/nginx.conf" \
		-g 'daemon off;' >>"$WORK/nginx/out.log" 2>&1 &
	SERVER_PID=$!
	PIDS+=("$SERVER_PID")
	wait_port "$NCHAN_PORT"
	wait_port "$NCHAN_PUB_PORT"
	local workers=""
	for _ in $(seq 50); do
		workers=$(pgrep -d, -P "$SERVER_PID" || true)
		[ -n "$workers" ] && break
		sleep 0.1
	done
	SERVER_PIDS="$SERVER_PID,$workers"
	SUB="http://127.0.0.1:$NCHAN_PORT/sub/{ch}"
	if [ "$tls" = tls ]; then
		wait_https "$NCHAN_PORT"
		SUB="https://127.0.0.1:$NCHAN_PORT/sub/{ch}"
	fi
}

# start_floor: the physical floor, HTTP/1.1.
start_floor() {
	free_port FLOOR_PORT
	"$FLOOR" -listen "127.0.0.1:$FLOOR_PORT" -redis "127.0.0.1:$REDIS_PORT" >>"$WORK/floor.log" 2>&1 &
	SERVER_PID=$!
	PIDS+=("$SERVER_PID")
	SERVER_PIDS=$SERVER_PID
	wait_port "$FLOOR_PORT"
	SUB="http://127.0.0.1:$FLOOR_PORT/sub/{ch}"
}

# start_gofloor: Go's HTTPS + HTTP/2 floor (bench/h2floor), with its pprof
# endpoint on PPROF_PORT.
start_gofloor() {
	free_port GOFLOOR_PORT
	free_port PPROF_PORT
	"$WORK/h2floor" -listen "127.0.0.1:$GOFLOOR_PORT" -redis "127.0.0.1:$REDIS_PORT" \
		-pprof "127.0.0.1:$PPROF_PORT" >>"$WORK/h2floor.log" 2>&1 &
	SERVER_PID=$!
	PIDS+=("$SERVER_PID")
	SERVER_PIDS=$SERVER_PID
	wait_port "$GOFLOOR_PORT"
	wait_https "$GOFLOOR_PORT"
	SUB="https://127.0.0.1:$GOFLOOR_PORT/sub/{ch}"
}

# run_one SERVER SCENARIO ROUND [sse-load flags]: a fresh Redis and server,
# one run, both stopped. SERVER is caddy-sse (publishing with Redis
# PUBLISH), caddy-sse/http (with sse_publish), caddy-sse/log (access log
# and metrics on), nchan (with its publisher), floor or go-floor (Redis
# PUBLISH). A scenario named h2-* runs over HTTPS + HTTP/2 (caddy-sse with
# bench/Caddyfile.prod, nchan with `ssl http2`, go-floor).
run_one() {
	local server=$1 name=$2 round=$3 pub tls="" flags=()
	shift 3
	case $name in h2-*) tls=tls flags=(-insecure) ;; esac
	start_redis
	pub="redis://127.0.0.1:$REDIS_PORT"
	case $server in
	caddy-sse)
		if [ -n "$tls" ]; then
			start_caddy_prod
			SUB="https://127.0.0.1:$TLS_PORT/sub/{ch}"
		else
			start_caddy
		fi
		;;
	caddy-sse/log)
		start_caddy_prod
		SUB="http://127.0.0.1:$CADDY_PORT/sub/{ch}"
		;;
	caddy-sse/http)
		start_caddy
		pub="http://127.0.0.1:$CADDY_PORT/pub/{ch}"
		;;
	nchan)
		start_nchan "$tls"
		pub="http://127.0.0.1:$NCHAN_PUB_PORT/pub/{ch}"
		;;
	floor) start_floor ;;
	go-floor) start_gofloor ;;
	esac
	sleep 0.5
	log "round $round: $name on $server"
	if ! "$WORK/sse-load" -json -name "$name" -label "$server" -run "$round" \
		-sub "$SUB" -pub "$pub" -server-pids "$SERVER_PIDS" -redis-pids "$REDIS_PID" \
		-timeout 4m "${flags[@]}" "$@" >>"$OUT/runs.jsonl" 2>>"$OUT/runs.log"; then
		log "round $round: $name on $server failed (see $OUT/runs.log)"
	fi
	stop_pid "$SERVER_PID"
	stop_pid "$REDIS_PID"
}

# --- The comparison ---------------------------------------------------------

# ordered ROUND SERVER...: the servers in order, reversed on even rounds.
ordered() {
	local round=$1 i
	shift
	local a=("$@")
	if [ $((round % 2)) = 0 ]; then
		for ((i = ${#a[@]} - 1; i >= 0; i--)); do echo "${a[i]}"; done
	else
		printf '%s\n' "${a[@]}"
	fi
}

servers=(caddy-sse nchan)
[ -n "$FLOOR" ] && servers+=(floor)
pubs=("${servers[@]}")
[ "$HTTP_PUB" = 1 ] && pubs+=(caddy-sse/http)
idles=("${servers[@]}")
[ "$LOGGED" = 1 ] && idles+=(caddy-sse/log)
# The floor files every socket away for good (it never notices a close):
# no connect loop for it.
connects=(caddy-sse nchan)
h2s=(caddy-sse nchan go-floor)

# want SCENARIO: whether SCENARIOS leaves it in.
want() { [ -z "$SCENARIOS" ] || [[ " $SCENARIOS " == *" $1 "* ]]; }

START=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for round in $(seq "$ROUNDS"); do
	want fanout && for s in $(ordered "$round" "${pubs[@]}"); do
		run_one "$s" fanout "$round" -mode fanout -streams "$FANOUT_STREAMS" \
			-events "$FANOUT_EVENTS" -rate "$FANOUT_RATE"
	done
	want fanout-light && for s in $(ordered "$round" "${servers[@]}"); do
		run_one "$s" fanout-light "$round" -mode fanout -streams "$FANOUT_STREAMS" \
			-events "$LIGHT_EVENTS" -rate "$LIGHT_RATE"
	done
	want unicast && for s in $(ordered "$round" "${pubs[@]}"); do
		run_one "$s" unicast "$round" -mode unicast -streams "$UNICAST_STREAMS" \
			-events "$UNICAST_EVENTS" -rate "$UNICAST_RATE" -pub-workers 16
	done
	want idle && for s in $(ordered "$round" "${idles[@]}"); do
		run_one "$s" idle "$round" -mode idle -streams "$IDLE_STREAMS" -settle "$IDLE_SETTLE"
	done
	want connect && for s in $(ordered "$round" "${connects[@]}"); do
		run_one "$s" connect "$round" -mode connect -duration "$CONNECT_SECONDS" -workers 32
	done
	if [ "$H2" = 1 ]; then
		want h2-idle && for s in $(ordered "$round" "${h2s[@]}"); do
			run_one "$s" h2-idle "$round" -mode idle -streams "$H2_STREAMS" -settle "$H2_SETTLE"
		done
		want h2-fanout && for s in $(ordered "$round" "${h2s[@]}"); do
			run_one "$s" h2-fanout "$round" -mode fanout -streams "$H2_STREAMS" \
				-events "$H2_EVENTS" -rate "$H2_RATE"
		done
	fi
done

if [ "$BIG" = 1 ] && want "fanout-$BIG_STREAMS"; then
	for s in "${servers[@]}"; do
		run_one "$s" "fanout-$BIG_STREAMS" 1 -mode fanout -streams "$BIG_STREAMS" \
			-events "$BIG_EVENTS" -rate "$BIG_RATE" -settle 3s -dial-concurrency 256
	done
fi

# Profiles of caddy: CPU during a longer fan-out, heap with idle streams.
if [ "$PROFILE" = 1 ]; then
	log "profiling caddy"
	start_redis
	start_caddy
	rm -f "$WORK/ready"
	"$WORK/sse-load" -name profile-fanout -label caddy-sse -mode fanout -sub "$SUB" \
		-pub "redis://127.0.0.1:$REDIS_PORT" -streams "$FANOUT_STREAMS" -events 300 -rate "$FANOUT_RATE" \
		-ready-file "$WORK/ready" -timeout 2m >"$WORK/profile-fanout.txt" 2>&1 &
	LOAD_PID=$!
	PIDS+=("$LOAD_PID")
	for _ in $(seq 600); do [ -e "$WORK/ready" ] && break; sleep 0.1; done
	curl -sf -o "$WORK/cpu.pprof" "http://127.0.0.1:$ADMIN_PORT/debug/pprof/profile?seconds=10" || log "no CPU profile"
	curl -sf -o "$WORK/heap-fanout.pprof" "http://127.0.0.1:$ADMIN_PORT/debug/pprof/heap" || log "no heap profile"
	wait "$LOAD_PID" || true
	stop_pid "$LOAD_PID"
	rm -f "$WORK/ready"
	"$WORK/sse-load" -name profile-idle -label caddy-sse -mode idle -sub "$SUB" \
		-streams "$IDLE_STREAMS" -settle "$IDLE_SETTLE" -server-pids "$SERVER_PID" \
		-ready-file "$WORK/ready" -hold 5s -timeout 2m >"$WORK/profile-idle.txt" 2>&1 &
	LOAD_PID=$!
	PIDS+=("$LOAD_PID")
	for _ in $(seq 600); do [ -e "$WORK/ready" ] && break; sleep 0.1; done
	curl -sf -o "$WORK/heap-idle.pprof" "http://127.0.0.1:$ADMIN_PORT/debug/pprof/heap" || log "no heap profile"
	curl -sf -o "$WORK/memstats-idle.txt" "http://127.0.0.1:$ADMIN_PORT/debug/pprof/heap?debug=1" || true
	curl -sf -o "$WORK/goroutines-idle.txt" "http://127.0.0.1:$ADMIN_PORT/debug/pprof/goroutine?debug=1" || true
	wait "$LOAD_PID" || true
	stop_pid "$LOAD_PID"
	stop_pid "$SERVER_PID"
	stop_pid "$REDIS_PID"
	{
		echo "# caddy CPU profile, 10 s of fan-out ($FANOUT_STREAMS streams, $FANOUT_RATE events/s)"
		go tool pprof -top -nodecount=40 "$WORK/caddy" "$WORK/cpu.pprof" 2>/dev/null | sed '/^File:/d;/^Build ID:/d'
		echo
		echo "# the same, cumulative"
		go tool pprof -top -cum -nodecount=40 "$WORK/caddy" "$WORK/cpu.pprof" 2>/dev/null | sed '1,/flat%/d'
	} >"$OUT/pprof-cpu-fanout.txt"
	{
		echo "# caddy heap (in use) with $IDLE_STREAMS idle streams"
		go tool pprof -top -sample_index=inuse_space -nodecount=30 "$WORK/caddy" "$WORK/heap-idle.pprof" 2>/dev/null |
			sed '/^File:/d;/^Build ID:/d'
		echo
		echo "# runtime.MemStats"
		sed -n '/^# runtime.MemStats/,$p' "$WORK/memstats-idle.txt" | grep -E '^# (HeapAlloc|HeapSys|HeapInuse|HeapIdle|HeapReleased|Stack|MSpan|Sys|NumGC|NextGC|GCSys|OtherSys) '
		echo
		echo "# goroutines"
		head -1 "$WORK/goroutines-idle.txt"
		echo
		echo "# caddy heap (in use) during fan-out"
		go tool pprof -top -sample_index=inuse_space -nodecount=20 "$WORK/caddy" "$WORK/heap-fanout.pprof" 2>/dev/null |
			sed '/^File:/d;/^Build ID:/d'
	} >"$OUT/pprof-heap.txt"
fi

# Profiles over HTTPS + HTTP/2, of caddy-sse and of Go's floor: heap,
# memory statistics and goroutines with the streams open and idle, then CPU
# during 10 s of fan-out.
H2_PROFILE_EVENTS=100
[ "$QUICK" = 1 ] && H2_PROFILE_EVENTS=60
profile_h2() {
	local server=$1 url tag
	start_redis
	case $server in
	caddy-sse)
		start_caddy_prod
		SUB="https://127.0.0.1:$TLS_PORT/sub/{ch}"
		url="http://127.0.0.1:$ADMIN_PORT/debug/pprof" tag=caddy
		;;
	go-floor)
		start_gofloor
		url="http://127.0.0.1:$PPROF_PORT/debug/pprof" tag=h2floor
		;;
	esac
	rm -f "$WORK/ready"
	"$WORK/sse-load" -name profile-h2 -label "$server" -mode fanout -sub "$SUB" -insecure \
		-pub "redis://127.0.0.1:$REDIS_PORT" -streams "$H2_STREAMS" -events "$H2_PROFILE_EVENTS" -rate "$H2_RATE" \
		-ready-file "$WORK/ready" -ready-pause 5s -timeout 2m >"$WORK/profile-h2-$tag.txt" 2>&1 &
	LOAD_PID=$!
	PIDS+=("$LOAD_PID")
	for _ in $(seq 600); do [ -e "$WORK/ready" ] && break; sleep 0.1; done
	# The streams are open and idle for 5 s: the heap (after a GC), the
	# memory statistics and the goroutines; then the fan-out starts.
	curl -sf -o "$WORK/h2-heap-$tag.pprof" "$url/heap?gc=1" || log "no heap profile of $server"
	curl -sf -o "$WORK/h2-memstats-$tag.txt" "$url/heap?debug=1" || true
	curl -sf -o "$WORK/h2-goroutines-$tag.txt" "$url/goroutine?debug=1" || log "no goroutines of $server"
	for _ in $(seq 50); do
		[ -e "$WORK/ready" ] && [ $(($(date +%s) - $(stat -c %Y "$WORK/ready"))) -ge 4 ] && break
		sleep 0.2
	done
	curl -sf -o "$WORK/h2-cpu-$tag.pprof" "$url/profile?seconds=10" || log "no CPU profile of $server"
	wait "$LOAD_PID" || true
	stop_pid "$LOAD_PID"
	stop_pid "$SERVER_PID"
	stop_pid "$REDIS_PID"
}

# goroutine_groups FILE: the goroutine count, then each group of identical
# stacks with 10 or more goroutines: its count and innermost frames.
goroutine_groups() {
	head -1 "$1"
	awk '/^[0-9]+ @ / { n = $1; show = n >= 10; frames = 0; if (show) printf "\n%6d", n; next }
		show && /^#\t0x/ && frames < 8 { printf "  %s", $3; frames++ }
		END { print "" }' "$1"
}

if [ "$PROFILE" = 1 ] && [ "$H2" = 1 ]; then
	log "profiling caddy and go-floor over HTTPS + HTTP/2"
	profile_h2 caddy-sse
	profile_h2 go-floor
	{
		for tag in caddy h2floor; do
			bin=$WORK/caddy
			[ "$tag" = h2floor ] && bin=$WORK/h2floor
			name=caddy-sse
			[ "$tag" = h2floor ] && name="go-floor (bench/h2floor)"
			echo "# $name: CPU, 10 s of HTTPS + HTTP/2 fan-out ($H2_STREAMS streams, one connection each, $H2_RATE events/s)"
			go tool pprof -top -nodecount=35 "$bin" "$WORK/h2-cpu-$tag.pprof" 2>/dev/null | sed '/^File:/d;/^Build ID:/d'
			echo
			echo "# the same, cumulative"
			go tool pprof -top -cum -nodecount=45 "$bin" "$WORK/h2-cpu-$tag.pprof" 2>/dev/null | sed '1,/flat%/d'
			echo
			echo "# $name: heap in use with the $H2_STREAMS streams open and idle (after a GC)"
			go tool pprof -top -sample_index=inuse_space -nodecount=25 "$bin" "$WORK/h2-heap-$tag.pprof" 2>/dev/null |
				sed '/^File:/d;/^Build ID:/d'
			echo
			echo "# $name: runtime.MemStats with the streams open and idle"
			sed -n '/^# runtime.MemStats/,$p' "$WORK/h2-memstats-$tag.txt" |
				grep -E '^# (HeapAlloc|HeapSys|HeapInuse|HeapIdle|HeapReleased|Stack|MSpan|Sys|NumGC|GCSys|OtherSys) ' || true
			echo
			echo "# $name: goroutines with the streams open and idle (groups of 10 or more: count, innermost frames)"
			goroutine_groups "$WORK/h2-goroutines-$tag.txt"
			echo
		done
	} >"$OUT/pprof-h2.txt"
fi

# --- The report -------------------------------------------------------------

BURST_OK=""
if [ "$BURST" = 1 ]; then
	log "burst check"
	if OUT="$OUT" CADDY="$CADDY" bash bench/burst.sh >>"$OUT/runs.log" 2>&1; then
		BURST_OK=yes
	else
		BURST_OK=no
		log "the burst check failed (see $OUT/burst.md)"
	fi
fi

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
ELAPSED=$(($(date +%s) - START))
"$WORK/sse-load" -summarize "$OUT/runs.jsonl" -md "$WORK/tables.md" -dat "$OUT/chart.dat" -baseline nchan,floor,go-floor
{
	echo "Run of $(date -u '+%Y-%m-%d %H:%M UTC') on $(nproc) cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r), open files $(ulimit -Hn)."
	echo "caddy-sse $(git describe --always --dirty 2>/dev/null || echo '?') with $(go version | cut -d' ' -f3), $("$WORK/caddy" version | cut -d' ' -f1);"
	echo "nginx $(nginx -v 2>&1 | sed 's|.*/||') with libnginx-mod-nchan $(dpkg-query -W -f='${Version}' libnginx-mod-nchan 2>/dev/null || echo '?'), worker_processes $NGINX_WORKERS;"
	echo "redis-server $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/'); OpenSSL $(openssl version | cut -d' ' -f2)."
	echo "$ROUNDS rounds, alternating the order; ${ELAPSED} s in all; load average $LOAD_START at the start, $LOAD_END at the end."
	echo "Command: \`bash bench/compare.sh\`$([ "$QUICK" = 1 ] && echo ' (QUICK=1)')$([ -n "$FLOOR" ] && echo ' with FLOOR_DIR set')."
	[ -n "${NOTE:-}" ] && echo "$NOTE"
	echo
	echo "Workloads: fanout $FANOUT_STREAMS streams on one channel, $FANOUT_EVENTS events at $FANOUT_RATE/s;" \
		"fanout-light the same streams, $LIGHT_EVENTS events at $LIGHT_RATE/s;" \
		"unicast $UNICAST_STREAMS streams on as many channels, $UNICAST_EVENTS events at $UNICAST_RATE/s;" \
		"idle $IDLE_STREAMS streams (one channel each), RSS after $IDLE_SETTLE;" \
		"connect: 32 clients open a stream (new channel each), read its head and close it, for $CONNECT_SECONDS."
	[ "$H2" = 1 ] && echo "HTTPS + HTTP/2, one TLS connection per stream: h2-idle $H2_STREAMS streams (one channel each), RSS after $H2_SETTLE;" \
		"h2-fanout $H2_STREAMS streams on one channel, $H2_EVENTS events at $H2_RATE/s."
	echo "Servers: caddy-sse is bench/Caddyfile (HTTP/1.1, no access log); caddy-sse/log and the h2-* runs of caddy-sse are bench/Caddyfile.prod" \
		"(access log to a file, metrics, Caddy's log at INFO; HTTPS with \`tls internal\`); nchan is nginx with Nchan (\`listen ... ssl http2\` for h2-*," \
		"with a self-signed ECDSA P-256 certificate); floor is the physical floor (one write(2) per subscriber per message, no HTTP server);" \
		"go-floor is bench/h2floor, a minimal net/http HTTP/2 SSE server."
	echo "Publishing: caddy-sse, floor and go-floor with Redis PUBLISH, caddy-sse/http with its sse_publish endpoint, nchan with its HTTP publisher (plain HTTP for h2-*)."
	echo
	cat "$WORK/tables.md"
	echo
	echo "![caddy-sse vs Nchan and the floors](compare.png)"
	if [ -n "$BURST_OK" ] && [ -f "$OUT/burst.md" ]; then
		echo
		cat "$OUT/burst.md"
	fi
} >"$OUT/results.md"
gnuplot -e "dat='$OUT/chart.dat'; out='$OUT/compare.png'" bench/chart.gp

# A partial run (SCENARIOS) or one written elsewhere (OUT) leaves the
# report alone.
if [ -z "$SCENARIOS" ] && [ "$OUT" = bench/results ] && [ -f BENCHMARKS.md ] &&
	grep -q '<!-- results:begin -->' BENCHMARKS.md; then
	awk -v f="$OUT/results.md" '
		/<!-- results:begin -->/ { print; while ((getline line < f) > 0) { sub(/\]\(compare.png\)/, "](bench/results/compare.png)", line); print line }; skip = 1; next }
		/<!-- results:end -->/ { skip = 0 }
		!skip { print }
	' BENCHMARKS.md >"$WORK/BENCHMARKS.md"
	cp "$WORK/BENCHMARKS.md" BENCHMARKS.md
fi
log "done in ${ELAPSED} s: $OUT/results.md, $OUT/compare.png"

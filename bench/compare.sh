#!/usr/bin/env bash
# caddy-sse against Nginx + Nchan, side by side, on this machine.
#
# Installs what it needs if missing (redis-server, nginx, libnginx-mod-nchan,
# gnuplot-nox; Debian, as root), builds caddy and sse-load, and for each
# round and workload starts a fresh redis-server and a fresh server on free
# loopback ports, runs cmd/sse-load against it and stops both. Rounds
# alternate the order of the servers. Writes into bench/results/: runs.jsonl
# (one JSON line per run), runs.log (the tool's tables), results.md (medians,
# ratios, every run), chart.dat and compare.png, the pprof top lists of
# caddy (pprof-cpu-fanout.txt, pprof-heap.txt); and puts
# results.md into BENCHMARKS.md between its results markers.
#
# Usage: bash bench/compare.sh        (about 10 minutes on 2 cores)
# Knobs (environment): ROUNDS (3), QUICK=1 (small workloads, to try the
# script), PROFILE=0 (skip the pprof run), BIG=0 (skip the 18,000 streams),
# HTTP_PUB=0 (skip caddy-sse with sse_publish), OUT (bench/results).
#
# Fairness: both servers may use both cores (caddy: GOMAXPROCS = 2, the Go
# default here; nginx: worker_processes auto = 2), and so may their Redis and
# the load tool, which is the same for both. A single nginx worker would cap
# Nchan at one core while the Go runtime uses two.
set -euo pipefail

cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
QUICK=${QUICK:-0}
PROFILE=${PROFILE:-1}
BIG=${BIG:-1}
HTTP_PUB=${HTTP_PUB:-1}
OUT=${OUT:-bench/results}
NGINX_WORKERS=${NGINX_WORKERS:-auto}

# Workloads.
FANOUT_STREAMS=5000 FANOUT_EVENTS=40 FANOUT_RATE=20
# The same streams at a tenth of the rate: below saturation of this machine.
LIGHT_EVENTS=20 LIGHT_RATE=2
UNICAST_STREAMS=5000 UNICAST_EVENTS=10000 UNICAST_RATE=2000
IDLE_STREAMS=8000 IDLE_SETTLE=5s
CONNECT_SECONDS=10s
BIG_STREAMS=18000 BIG_EVENTS=10 BIG_RATE=5
if [ "$QUICK" = 1 ]; then
	FANOUT_STREAMS=500 UNICAST_STREAMS=500 UNICAST_EVENTS=1000 UNICAST_RATE=500
	IDLE_STREAMS=800 IDLE_SETTLE=2s CONNECT_SECONDS=2s BIG_STREAMS=2000
fi

log() { printf '%s compare: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# --- What the benchmark needs ---------------------------------------------

nchan_module() {
	local dir
	dir=$(nginx -V 2>&1 | sed -n 's/.*--modules-path=\([^ ]*\).*/\1/p')
	echo "${dir:-/usr/lib/nginx/modules}/ngx_nchan_module.so"
}

install_missing() {
	local pkgs=()
	command -v redis-server >/dev/null || pkgs+=(redis-server)
	command -v nginx >/dev/null || pkgs+=(nginx)
	{ command -v nginx >/dev/null && [ -e "$(nchan_module)" ]; } || pkgs+=(libnginx-mod-nchan)
	command -v gnuplot >/dev/null || pkgs+=(gnuplot-nox)
	command -v ss >/dev/null || pkgs+=(iproute2)
	[ ${#pkgs[@]} -eq 0 ] && return
	log "installing ${pkgs[*]}"
	if ! apt-cache show "${pkgs[@]}" >/dev/null 2>&1; then
		apt-get update -q
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}"
}

install_missing
for tool in redis-server nginx gnuplot go ss curl; do
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

log "building caddy and sse-load"
go build -o "$WORK/caddy" ./cmd/caddy
go build -o "$WORK/sse-load" ./cmd/sse-load
mkdir -p "$OUT"
: >"$OUT/runs.jsonl"
: >"$OUT/runs.log"

# --- Processes --------------------------------------------------------------

# free_port VAR: sets VAR to a loopback TCP port nothing uses, and that this
# script has not handed out before.
USED_PORTS=" "
free_port() {
	local p
	for _ in $(seq 200); do
		p=$((20000 + RANDOM % 30000))
		case $USED_PORTS in *" $p "*) continue ;; esac
		if [ -z "$(ss -Htan "sport = :$p")" ]; then
			USED_PORTS="$USED_PORTS$p "
			printf -v "$1" '%s' "$p"
			return
		fi
	done
	log "no free port"
	return 1
}

wait_port() {
	local i
	for i in $(seq 100); do
		if (: >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
			return
		fi
		[ "$i" = 100 ] || sleep 0.1
	done
	log "nothing listens on 127.0.0.1:$1"
	return 1
}

# stop_pid PID: ends a process this script started, and forgets it.
stop_pid() {
	local pid=$1 i rest=()
	if kill "$pid" 2>/dev/null; then
		for i in $(seq 50); do
			kill -0 "$pid" 2>/dev/null || break
			[ "$i" = 50 ] && kill -9 "$pid" 2>/dev/null
			sleep 0.1
		done
	fi
	wait "$pid" 2>/dev/null || true
	for i in "${PIDS[@]}"; do
		[ "$i" = "$pid" ] || rest+=("$i")
	done
	PIDS=("${rest[@]}")
}

start_redis() {
	free_port REDIS_PORT
	redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
		--dir "$WORK" --logfile "$WORK/redis.log" --maxclients 4000 &
	REDIS_PID=$!
	PIDS+=("$REDIS_PID")
	wait_port "$REDIS_PORT"
}

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

start_nchan() {
	free_port NCHAN_PORT
	mkdir -p "$WORK/nginx"
	sed -e "s|@NCHAN_MODULE@|$(nchan_module)|" -e "s|@WORKERS@|$NGINX_WORKERS|" \
		-e "s|@DIR@|$WORK/nginx|g" -e "s|@REDIS_PORT@|$REDIS_PORT|" -e "s|@PORT@|$NCHAN_PORT|" \
		bench/nginx-nchan.conf.in >"$WORK/nginx/nginx.conf"
	nginx -p "$WORK/nginx/" -e "$WORK/nginx/error.log" -c "$WORK/nginx/nginx.conf" \
		-g 'daemon off;' >>"$WORK/nginx/out.log" 2>&1 &
	SERVER_PID=$!
	PIDS+=("$SERVER_PID")
	wait_port "$NCHAN_PORT"
	local workers=""
	for _ in $(seq 50); do
		workers=$(pgrep -d, -P "$SERVER_PID" || true)
		[ -n "$workers" ] && break
		sleep 0.1
	done
	SERVER_PIDS="$SERVER_PID,$workers"
	SUB="http://127.0.0.1:$NCHAN_PORT/sub/{ch}"
}

# run_one SERVER SCENARIO ROUND [sse-load flags]: a fresh Redis and server,
# one run, both stopped. SERVER is caddy-sse (publishing with Redis
# PUBLISH), caddy-sse/http (with sse_publish) or nchan (with its publisher).
run_one() {
	local server=$1 name=$2 round=$3 pub
	shift 3
	start_redis
	case $server in
	caddy-sse)
		start_caddy
		pub="redis://127.0.0.1:$REDIS_PORT"
		;;
	caddy-sse/http)
		start_caddy
		pub="http://127.0.0.1:$CADDY_PORT/pub/{ch}"
		;;
	nchan)
		start_nchan
		pub="http://127.0.0.1:$NCHAN_PORT/pub/{ch}"
		;;
	esac
	sleep 0.5
	log "round $round: $name on $server"
	if ! "$WORK/sse-load" -json -name "$name" -label "$server" -run "$round" \
		-sub "$SUB" -pub "$pub" -server-pids "$SERVER_PIDS" -redis-pids "$REDIS_PID" \
		-timeout 4m "$@" >>"$OUT/runs.jsonl" 2>>"$OUT/runs.log"; then
		log "round $round: $name on $server failed (see $OUT/runs.log)"
	fi
	stop_pid "$SERVER_PID"
	stop_pid "$REDIS_PID"
}

# --- The comparison ---------------------------------------------------------

START=$(date +%s)
for round in $(seq "$ROUNDS"); do
	servers=(caddy-sse nchan)
	pubs=(caddy-sse nchan)
	[ "$HTTP_PUB" = 1 ] && pubs=(caddy-sse nchan caddy-sse/http)
	if [ $((round % 2)) = 0 ]; then
		servers=(nchan caddy-sse)
		pubs=(nchan caddy-sse)
		[ "$HTTP_PUB" = 1 ] && pubs=(caddy-sse/http nchan caddy-sse)
	fi
	for s in "${pubs[@]}"; do
		run_one "$s" fanout "$round" -mode fanout -streams "$FANOUT_STREAMS" \
			-events "$FANOUT_EVENTS" -rate "$FANOUT_RATE"
	done
	for s in "${servers[@]}"; do
		run_one "$s" fanout-light "$round" -mode fanout -streams "$FANOUT_STREAMS" \
			-events "$LIGHT_EVENTS" -rate "$LIGHT_RATE"
	done
	for s in "${pubs[@]}"; do
		run_one "$s" unicast "$round" -mode unicast -streams "$UNICAST_STREAMS" \
			-events "$UNICAST_EVENTS" -rate "$UNICAST_RATE" -pub-workers 16
	done
	for s in "${servers[@]}"; do
		run_one "$s" idle "$round" -mode idle -streams "$IDLE_STREAMS" -settle "$IDLE_SETTLE"
	done
	for s in "${servers[@]}"; do
		run_one "$s" connect "$round" -mode connect -duration "$CONNECT_SECONDS" -workers 32
	done
done

if [ "$BIG" = 1 ]; then
	for s in caddy-sse nchan; do
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

# --- The report -------------------------------------------------------------

ELAPSED=$(($(date +%s) - START))
"$WORK/sse-load" -summarize "$OUT/runs.jsonl" -md "$WORK/tables.md" -dat "$OUT/chart.dat" -baseline nchan
{
	echo "Run of $(date -u '+%Y-%m-%d %H:%M UTC') on $(nproc) cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r), open files $(ulimit -Hn)."
	echo "caddy-sse $(git describe --always --dirty 2>/dev/null || echo '?') with $(go version | cut -d' ' -f3), $("$WORK/caddy" version | cut -d' ' -f1);"
	echo "nginx $(nginx -v 2>&1 | sed 's|.*/||') with libnginx-mod-nchan $(dpkg-query -W -f='${Version}' libnginx-mod-nchan 2>/dev/null || echo '?'), worker_processes $NGINX_WORKERS;"
	echo "redis-server $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/'). $ROUNDS rounds, alternating the order; ${ELAPSED} s in all."
	echo "Command: \`bash bench/compare.sh\`$([ "$QUICK" = 1 ] && echo ' (QUICK=1)')."
	echo
	echo "Workloads: fanout $FANOUT_STREAMS streams on one channel, $FANOUT_EVENTS events at $FANOUT_RATE/s;" \
		"fanout-light the same streams, $LIGHT_EVENTS events at $LIGHT_RATE/s;" \
		"unicast $UNICAST_STREAMS streams on as many channels, $UNICAST_EVENTS events at $UNICAST_RATE/s;" \
		"idle $IDLE_STREAMS streams (one channel each), RSS after $IDLE_SETTLE;" \
		"connect: 32 clients open a stream (new channel each), read its head and close it, for $CONNECT_SECONDS."
	echo "Publishing: caddy-sse with Redis PUBLISH, caddy-sse/http with its sse_publish endpoint, nchan with its HTTP publisher."
	echo
	cat "$WORK/tables.md"
	echo
	echo "![caddy-sse vs Nchan](compare.png)"
} >"$OUT/results.md"
gnuplot -e "dat='$OUT/chart.dat'; out='$OUT/compare.png'" bench/chart.gp

if [ -f BENCHMARKS.md ] && grep -q '<!-- results:begin -->' BENCHMARKS.md; then
	awk -v f="$OUT/results.md" '
		/<!-- results:begin -->/ { print; while ((getline line < f) > 0) { sub(/\]\(compare.png\)/, "](bench/results/compare.png)", line); print line }; skip = 1; next }
		/<!-- results:end -->/ { skip = 0 }
		!skip { print }
	' BENCHMARKS.md >"$WORK/BENCHMARKS.md"
	cp "$WORK/BENCHMARKS.md" BENCHMARKS.md
fi
log "done in ${ELAPSED} s: $OUT/results.md, $OUT/compare.png"

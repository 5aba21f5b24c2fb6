#!/usr/bin/env bash
# Burst check of issue 12: caddy-sse with `buffer 64` (bench/Caddyfile.prod:
# access log and metrics on), one channel, and 5,000 events of 2 KB
# published back to back with one `redis-cli --pipe`. Fast readers (curl
# and a Python socket reader over HTTP/1.1, curl over HTTPS + HTTP/2) must
# receive all of them, in order; a client that never reads (4 KiB receive
# buffer) must be cut: its stream closed by the server, which
# caddy_sse_streams_closed_total{reason="overflow"} counts.
#
# Writes $OUT/burst.md (a table, included by compare.sh in results.md) and
# $OUT/burst.jsonl (one JSON line per client). Exits 1 if a check fails.
#
# Usage: bash bench/burst.sh    (about 10 s; as root on Debian it installs
# what is missing). Knobs: OUT (bench/results), CADDY (a caddy binary with
# the module; default: built from ./cmd/caddy), BURST_EVENTS (5000),
# BURST_SIZE (2048), BURST_BUFFER (64), BURST_TIMEOUT (60, seconds per
# client).
set -euo pipefail

cd "$(dirname "$0")/.."
LOG_NAME=burst
OUT=${OUT:-bench/results}
EVENTS=${BURST_EVENTS:-5000}
SIZE=${BURST_SIZE:-2048}
BUFFER=${BURST_BUFFER:-64}
TIMEOUT=${BURST_TIMEOUT:-60}
# shellcheck source=bench/lib.sh
. bench/lib.sh

pkgs=()
command -v redis-server >/dev/null || pkgs+=(redis-server)
command -v redis-cli >/dev/null || pkgs+=(redis-tools)
command -v curl >/dev/null || pkgs+=(curl)
command -v python3 >/dev/null || pkgs+=(python3)
command -v ss >/dev/null || pkgs+=(iproute2)
apt_install "${pkgs[@]}"

WORK=$(mktemp -d -t sse-burst.XXXXXX)
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

if [ -z "${CADDY:-}" ]; then
	log "building caddy"
	go build -o "$WORK/caddy" ./cmd/caddy
	CADDY=$WORK/caddy
fi
mkdir -p "$OUT"

start_redis
SSE_BUFFER=$BUFFER start_caddy_prod
python3 bench/burst_client.py gen burst "$EVENTS" "$SIZE" >"$WORK/burst.resp"
path=/sub/burst

metric() { # metric NAME{LABELS}: its value in caddy's /metrics, or 0
	curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | awk -v m="$1" '$1 == m { print $2; found = 1 } END { if (!found) print 0 }'
}

curl -sN --max-time "$TIMEOUT" "http://127.0.0.1:$CADDY_PORT$path" >"$WORK/curl-h1.out" &
CURL_H1=$!
PIDS+=("$CURL_H1")
curl -skN --http2 --max-time "$TIMEOUT" "https://127.0.0.1:$TLS_PORT$path" >"$WORK/curl-h2.out" &
CURL_H2=$!
PIDS+=("$CURL_H2")
python3 bench/burst_client.py read "$CADDY_PORT" "$path" "$EVENTS" "$TIMEOUT" >"$WORK/python.json" &
PY=$!
PIDS+=("$PY")
python3 bench/burst_client.py stall "$CADDY_PORT" "$path" "$WORK/go" "$TIMEOUT" >"$WORK/stall.json" &
STALL=$!
PIDS+=("$STALL")

for i in $(seq 100); do
	[ "$(metric caddy_sse_streams_open)" = 4 ] && break
	[ "$i" = 100 ] && { log "the 4 streams did not open"; exit 1; }
	sleep 0.1
done

log "publishing $EVENTS x $SIZE bytes with redis-cli --pipe"
t0=$(date +%s.%N)
redis-cli -p "$REDIS_PORT" --pipe <"$WORK/burst.resp" >"$WORK/pipe.out"
t1=$(date +%s.%N)
PUB_S=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')

# Wait for each curl to have every event, or to end, or the deadline.
count_file() { grep -c '^data: seq=' "$1" 2>/dev/null || true; }
declare -A ENDED
deadline=$(($(date +%s) + TIMEOUT))
for pid in $CURL_H1 $CURL_H2; do
	file=$WORK/curl-h1.out
	[ "$pid" = "$CURL_H2" ] && file=$WORK/curl-h2.out
	while :; do
		if ! kill -0 "$pid" 2>/dev/null; then
			rc=0
			wait "$pid" || rc=$?
			case $rc in
			28) ENDED[$pid]=timeout ;;
			*) ENDED[$pid]="closed (curl exit $rc)" ;;
			esac
			break
		fi
		if [ "$(count_file "$file")" -ge "$EVENTS" ]; then
			ENDED[$pid]=count
			break
		fi
		if [ "$(date +%s)" -ge "$deadline" ]; then
			ENDED[$pid]=timeout
			break
		fi
		sleep 0.2
	done
	stop_pid "$pid"
done
wait "$PY" || true
touch "$WORK/go"
wait "$STALL" || true

OVERFLOW=$(metric 'caddy_sse_streams_closed_total{reason="overflow"}')
CLOSED=$(curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | awk '/^caddy_sse_streams_closed_total\{/ { printf "%s%s %s", sep, $1, $2; sep = ", " }')
DROPPED=$(curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | awk '/^caddy_sse_events_dropped_total\{/ { printf "%s%s %s", sep, $1, $2; sep = ", " }')
stop_pid "$SERVER_PID"
stop_pid "$REDIS_PID"

# One JSON line per client.
{
	printf '{"client":"curl, HTTP/1.1",%s\n' "$(python3 bench/burst_client.py count "$WORK/curl-h1.out" "${ENDED[$CURL_H1]}" | cut -c2-)"
	printf '{"client":"Python socket reader, HTTP/1.1",%s\n' "$(cut -c2- "$WORK/python.json")"
	printf '{"client":"curl, HTTPS + HTTP/2",%s\n' "$(python3 bench/burst_client.py count "$WORK/curl-h2.out" "${ENDED[$CURL_H2]}" | cut -c2-)"
	printf '{"client":"never reads (4 KiB receive buffer), HTTP/1.1",%s\n' "$(cut -c2- "$WORK/stall.json")"
} >"$OUT/burst.jsonl"

# The table and the verdicts.
rc=0
python3 - "$OUT/burst.jsonl" "$EVENTS" "$SIZE" "$BUFFER" "$PUB_S" "$OVERFLOW" "$CLOSED" "$DROPPED" >"$OUT/burst.md" <<'EOF' || rc=$?
import json, sys
path, events, size, buffer, pub_s, overflow, closed, dropped = sys.argv[1:]
events = int(events)
rows = [json.loads(l) for l in open(path)]
print("Burst (`bench/burst.sh`): caddy-sse with `buffer %s`, access log and metrics on; %d events of %s bytes "
      "published back to back on one channel with one `redis-cli --pipe` (%.2f s)." % (buffer, events, size, float(pub_s)))
print()
print("| client | events received | in order | how its stream ended | bytes |")
print("|---|--:|---|---|--:|")
# The target is HTTP/1.1 (taken over: the socket's buffer absorbs a
# burst); over HTTP/2 the handler's writer is slower than the burst, and
# the bounded queue counts what it has not taken yet.
ok_fast, h2 = True, []
for r in rows:
    fast = not r["client"].startswith("never") and "HTTP/2" not in r["client"]
    if "HTTP/2" in r["client"]:
        h2.append("%s: %d / %d" % (r["client"], r["events"], events))
    ended = {"count": "read all it expected", "EOF": "closed by the server (EOF)", "reset": "reset by the server",
             "open": "still open (not cut)", "timeout": "timed out"}.get(r["ended"], r["ended"])
    if fast and r["events"] != events:
        ok_fast = False
    print("| %s | %d / %d | %s | %s | %d |" % (r["client"], r["events"], events, "yes" if r["in_order"] else "**no**", ended, r["bytes"]))
stall = rows[-1]
cut = stall["ended"] in ("EOF", "reset")
print()
print("Counters after the burst: %s; %s." % (closed or "no caddy_sse_streams_closed_total", dropped or "no events dropped"))
print()
print("| check | met |")
print("|---|---|")
print("| every fast HTTP/1.1 reader receives all %d events | %s |" % (events, "yes" if ok_fast else "**no**"))
print("| the client that never reads is cut (stream closed; overflow closes: %s) | %s |" % (overflow, "yes" if cut else "**no**"))
if h2:
    print()
    print("Not a target: %s (raise `buffer` for bursts over HTTP/2)." % "; ".join(h2))
sys.exit(0 if ok_fast and cut else 1)
EOF
cat "$OUT/burst.md"
exit $rc

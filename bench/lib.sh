# Shell functions shared by bench/compare.sh and bench/burst.sh; sourced,
# not run. The sourcing script sets WORK (its temporary directory), the
# array PIDS (processes it started, ended by its exit trap) and LOG_NAME.

log() { printf '%s %s: %s\n' "$(date +%H:%M:%S)" "${LOG_NAME:-bench}" "$*" >&2; }

# apt_install PKG...: installs Debian packages (as root), running apt-get
# update first if apt does not know them yet.
apt_install() {
	[ $# -eq 0 ] && return
	log "installing $*"
	if ! apt-cache show "$@" >/dev/null 2>&1; then
		apt-get update -q
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

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

# wait_port PORT: waits up to 10 s for something to listen on 127.0.0.1:PORT.
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

# wait_https PORT: waits up to 10 s for a TLS handshake on 127.0.0.1:PORT to
# succeed (a server with a certificate it issues itself at start).
wait_https() {
	local i
	for i in $(seq 100); do
		if curl -sk -o /dev/null --max-time 2 "https://127.0.0.1:$1/"; then
			return
		fi
		[ "$i" = 100 ] || sleep 0.1
	done
	log "no TLS handshake on 127.0.0.1:$1"
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

# start_redis: a fresh redis-server on a free port (REDIS_PORT, REDIS_PID).
start_redis() {
	free_port REDIS_PORT
	redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
		--dir "$WORK" --logfile "$WORK/redis.log" --maxclients 4000 &
	REDIS_PID=$!
	PIDS+=("$REDIS_PID")
	wait_port "$REDIS_PORT"
}

# start_caddy_prod: caddy with bench/Caddyfile.prod (access log, metrics,
# HTTPS with tls internal and the same site over plain HTTP): TLS_PORT,
# CADDY_PORT, ADMIN_PORT, SERVER_PID. CADDY is the binary; SSE_BUFFER, if
# set, the per-stream queue.
start_caddy_prod() {
	free_port TLS_PORT
	free_port CADDY_PORT
	free_port ADMIN_PORT
	TLS_PORT=$TLS_PORT CADDY_PORT=$CADDY_PORT ADMIN_PORT=$ADMIN_PORT REDIS_PORT=$REDIS_PORT \
		ACCESS_LOG="$WORK/access.log" SSE_BUFFER="${SSE_BUFFER:-0}" \
		XDG_DATA_HOME="$WORK/xdg" XDG_CONFIG_HOME="$WORK/xdg" \
		"$CADDY" run --config bench/Caddyfile.prod --adapter caddyfile >>"$WORK/caddy.log" 2>&1 &
	SERVER_PID=$!
	PIDS+=("$SERVER_PID")
	SERVER_PIDS=$SERVER_PID
	wait_port "$CADDY_PORT"
	wait_port "$TLS_PORT"
	wait_https "$TLS_PORT"
}

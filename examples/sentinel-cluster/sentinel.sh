#!/bin/sh
# Starts, on this machine, the servers sentinel.Caddyfile expects, to try
# it: a Redis master on 127.0.0.1:6380, a replica of it on 6381, and three
# Sentinels on 26379, 26380 and 26381 that watch the master as "mymaster".
# For trying things out only: loopback, no password, no persistence.
#
#   examples/sentinel-cluster/sentinel.sh start
#   examples/sentinel-cluster/sentinel.sh stop
#
# Their files (the configs the Sentinels rewrite, logs, pid files) go in
# $DIR, by default ${TMPDIR:-/tmp}/caddy-sse-sentinel. MASTER_PORT,
# REPLICA_PORT and SENTINEL_PORTS (a space-separated list) change the ports;
# the Caddyfile lists the Sentinels' ones. Needs redis-server and redis-cli
# (apt-get install redis-server).
set -eu

dir=${DIR:-${TMPDIR:-/tmp}/caddy-sse-sentinel}
master=${MASTER_PORT:-6380}
replica=${REPLICA_PORT:-6381}
sentinels=${SENTINEL_PORTS:-26379 26380 26381}

# alive <pid>: the process runs (a zombie, which an init that does not reap
# leaves behind, has stopped).
alive() {
	state=$(ps -p "$1" -o stat= 2>/dev/null) || return 1
	[ -n "$state" ] && [ "${state#Z}" = "$state" ]
}

# free <port>: nothing listens on 127.0.0.1:<port>.
free() {
	redis-cli -p "$1" PING 2>&1 | grep -q 'Connection refused'
}

# wait_for <what> <command...>: runs the command every 0.1s until it
# succeeds, for at most 30s.
wait_for() {
	what=$1
	shift
	i=0
	until "$@" >/dev/null 2>&1; do
		i=$((i + 1))
		if [ "$i" -ge 300 ]; then
			echo "sentinel.sh: gave up waiting for $what after 30s (logs in $dir)" >&2
			exit 1
		fi
		sleep 0.1
	done
}

# redis <port> <name> [<option>...]: a Redis server in the background, on
# loopback, keeping nothing on disk.
redis() {
	port=$1
	name=$2
	shift 2
	redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
		--dir "$dir" --daemonize yes --pidfile "$dir/$name.pid" --logfile "$dir/$name.log" "$@"
}

replica_synced() {
	redis-cli -p "$replica" INFO replication | grep -q '^master_link_status:up'
}

# A Sentinel knows the master, and the replica it found through it.
sentinel_ready() {
	redis-cli -p "$1" SENTINEL replicas mymaster | grep -qx "127.0.0.1:$replica"
}

start() {
	for f in "$dir"/*.pid; do
		if [ -e "$f" ]; then
			echo "sentinel.sh: already running (pid files in $dir); stop it first" >&2
			exit 1
		fi
	done
	for p in "$master" "$replica" $sentinels; do
		if ! free "$p"; then
			echo "sentinel.sh: port $p is in use; choose others (see the top of $0)" >&2
			exit 1
		fi
	done
	mkdir -p "$dir"
	redis "$master" master
	redis "$replica" replica --replicaof 127.0.0.1 "$master"
	wait_for "the replica on $replica to sync with the master on $master" replica_synced
	for p in $sentinels; do
		# Sentinel rewrites its config file: one each, in $dir.
		cat >"$dir/sentinel-$p.conf" <<CONF
port $p
bind 127.0.0.1
dir $dir
daemonize yes
pidfile $dir/sentinel-$p.pid
logfile $dir/sentinel-$p.log
sentinel monitor mymaster 127.0.0.1 $master 2
sentinel down-after-milliseconds mymaster 5000
sentinel failover-timeout mymaster 10000
CONF
		redis-server "$dir/sentinel-$p.conf" --sentinel
	done
	for p in $sentinels; do
		wait_for "the Sentinel on $p to know the master and the replica" sentinel_ready "$p"
	done
	echo "master 127.0.0.1:$master, replica 127.0.0.1:$replica, Sentinels on ports $sentinels (files in $dir)"
}

stop() {
	for f in "$dir"/*.pid; do
		[ -e "$f" ] || continue
		pid=$(cat "$f")
		# Only a redis-server: a pid file left behind (by a reboot, say) may
		# name a process that reused the number.
		case $(ps -p "$pid" -o comm= 2>/dev/null || true) in
		redis-server* | redis-sentinel*) kill "$pid" ;;
		esac
		i=0
		while alive "$pid" && [ "$i" -lt 100 ]; do
			i=$((i + 1))
			sleep 0.1
		done
		rm -f "$f"
	done
	echo "stopped (files left in $dir)"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
*)
	echo "usage: $0 start|stop" >&2
	exit 2
	;;
esac

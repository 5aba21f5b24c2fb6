#!/bin/sh
# Starts, on this machine, the Redis Cluster cluster.Caddyfile expects, to
# try it: three masters on 127.0.0.1:7000, 7001 and 7002 (no replicas),
# joined with redis-cli --cluster create. For trying things out only:
# loopback, no password, no persistence.
#
#   examples/sentinel-cluster/cluster.sh start
#   examples/sentinel-cluster/cluster.sh stop
#
# Their files (nodes.conf, logs, pid files) go in $DIR, by default
# ${TMPDIR:-/tmp}/caddy-sse-cluster, one directory per node. CLUSTER_PORTS
# (a space-separated list) changes the ports; each node's cluster bus is on
# its port + 10000 unless an item says otherwise (port:busport). Needs
# redis-server and redis-cli (apt-get install redis-server).
set -eu

dir=${DIR:-${TMPDIR:-/tmp}/caddy-sse-cluster}
ports=${CLUSTER_PORTS:-7000 7001 7002}

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
			echo "cluster.sh: gave up waiting for $what after 30s (logs in $dir)" >&2
			exit 1
		fi
		sleep 0.1
	done
}

# port <item>, bus <item>: a node's port and its cluster bus port, from an
# item of CLUSTER_PORTS (port or port:busport).
port() {
	echo "${1%%:*}"
}
bus() {
	case $1 in
	*:*) echo "${1#*:}" ;;
	*) echo $((${1} + 10000)) ;;
	esac
}

cluster_ok() {
	redis-cli -p "$1" CLUSTER INFO | grep -q '^cluster_state:ok'
}

start() {
	for item in $ports; do
		if [ -e "$dir/${item%%:*}/redis.pid" ]; then
			echo "cluster.sh: already running (pid files in $dir); stop it first" >&2
			exit 1
		fi
	done
	for item in $ports; do
		for p in $(port "$item") $(bus "$item"); do
			if ! free "$p"; then
				echo "cluster.sh: port $p is in use; choose others (see the top of $0)" >&2
				exit 1
			fi
		done
	done
	nodes=
	for item in $ports; do
		port=$(port "$item")
		bus=$(bus "$item")
		mkdir -p "$dir/$port"
		# A new cluster each time: a node that remembers an old one
		# (nodes.conf) refuses to join a new one.
		rm -f "$dir/$port/nodes.conf"
		redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
			--cluster-enabled yes --cluster-config-file nodes.conf --cluster-port "$bus" \
			--dir "$dir/$port" --daemonize yes --pidfile "$dir/$port/redis.pid" \
			--logfile "$dir/$port/redis.log"
		wait_for "the node on $port to answer" redis-cli -p "$port" PING
		nodes="$nodes 127.0.0.1:$port"
	done
	# $nodes unquoted: one argument per node.
	redis-cli --cluster create $nodes --cluster-yes >"$dir/create.log" 2>&1 || {
		cat "$dir/create.log" >&2
		exit 1
	}
	for item in $ports; do
		wait_for "the cluster to be ok on ${item%%:*}" cluster_ok "${item%%:*}"
	done
	echo "Redis Cluster on$nodes (files in $dir)"
}

stop() {
	for item in $ports; do
		f=$dir/${item%%:*}/redis.pid
		[ -e "$f" ] || continue
		pid=$(cat "$f")
		# Only a redis-server: a pid file left behind (by a reboot, say) may
		# name a process that reused the number.
		case $(ps -p "$pid" -o comm= 2>/dev/null || true) in
		redis-server*) kill "$pid" ;;
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

#!/bin/sh
# Publish one event to a caddy-sse channel with redis-cli.
#
#   ./publish.sh user:42 '{"text":"hello"}'       fire and forget (PUBLISH)
#   ./publish.sh -r user:42 '{"text":"hello"}'    resumable (FCALL sse_publish); prints the event id
#
# REDIS_URL (default redis://127.0.0.1:6379) says which Redis.
set -eu

resumable=no
if [ "${1:-}" = "-r" ]; then
	resumable=yes
	shift
fi
if [ $# -ne 2 ]; then
	echo "usage: $0 [-r] <channel> <payload>" >&2
	exit 2
fi
channel=$1
payload=$2
url=${REDIS_URL:-redis://127.0.0.1:6379}

if [ "$resumable" = yes ]; then
	# Caddy installs the sse_publish function when a config uses `history`.
	redis-cli -u "$url" --raw FCALL sse_publish 1 "$channel" "$payload"
else
	# Redis answers how many Caddy instances received it; not needed here.
	redis-cli -u "$url" PUBLISH "$channel" "$payload" >/dev/null
fi

#!/usr/bin/env bash
# Builds Caddy with this module using xcaddy, from the root of this
# checkout, with the command the README gives:
#
#   xcaddy build --with github.com/caddy-sse/caddy-sse@v0.0.0-00010101000000-000000000000=.
#
# and checks that the binary has the module's Caddy modules and adapts every
# example's Caddyfile. For CI; it takes a few minutes (xcaddy builds all of
# Caddy with -trimpath).
#
#   examples/xcaddy/check.sh
#
# Needs Go and xcaddy: go install github.com/caddyserver/xcaddy/cmd/xcaddy@latest
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)

# The README's --with, which docs_test.go checks is the one there. "=." is
# this checkout. The zero version pinned before it keeps go from asking the
# module proxy for the module's versions: the module is not published, and a
# proxy that answers that question with 403 (as some mirrors do for modules
# they do not hold, where proxy.golang.org answers 404) stops go get,
# whereas for a pinned version go falls back to the replacement whatever the
# proxy answers.
with="github.com/caddy-sse/caddy-sse@v0.0.0-00010101000000-000000000000=."

xcaddy=${XCADDY:-}
if [ -z "$xcaddy" ]; then
	if command -v xcaddy >/dev/null 2>&1; then
		xcaddy=xcaddy
	elif [ -x "$(go env GOPATH)/bin/xcaddy" ]; then
		xcaddy="$(go env GOPATH)/bin/xcaddy"
	else
		echo "xcaddy not found: go install github.com/caddyserver/xcaddy/cmd/xcaddy@latest" >&2
		exit 1
	fi
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "xcaddy build --with $with"
# From the checkout's root, as the README says: xcaddy resolves "." there.
if ! (cd "$root" && "$xcaddy" build --with "$with" --output "$work/caddy") >"$work/build.log" 2>&1; then
	cat "$work/build.log"
	exit 1
fi
cd "$work"
"$work/caddy" version

"$work/caddy" list-modules >modules.txt
for m in http.handlers.sse http.handlers.sse_publish admin.api.sse; do
	if ! grep -qx "$m" modules.txt; then
		echo "FAIL: caddy list-modules has no $m" >&2
		exit 1
	fi
	echo "ok: caddy list-modules has $m"
done

n=0
for f in "$root"/examples/*/Caddyfile "$root"/examples/*/*.Caddyfile; do
	[ -e "$f" ] || continue
	if ! "$work/caddy" adapt --config "$f" >/dev/null 2>adapt.log; then
		echo "FAIL: caddy adapt --config ${f#"$root"/}" >&2
		cat adapt.log >&2
		exit 1
	fi
	n=$((n + 1))
done
echo "ok: the xcaddy-built caddy adapts the $n Caddyfiles of examples/"

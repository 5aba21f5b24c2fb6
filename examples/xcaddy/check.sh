#!/usr/bin/env bash
# Builds Caddy with this module using xcaddy, from this checkout, exactly as
# the README says (xcaddy build --with github.com/caddy-sse/caddy-sse=.),
# and checks that the binary has the module's Caddy modules and adapts every
# example's Caddyfile. For CI; it takes a few minutes (xcaddy builds all of
# Caddy with -trimpath).
#
#   examples/xcaddy/check.sh
#
# Needs Go and xcaddy: go install github.com/caddyserver/xcaddy/cmd/xcaddy@latest
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
module=github.com/caddy-sse/caddy-sse

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
cd "$work"

echo "xcaddy build --with $module=$root"
if ! "$xcaddy" build --with "$module=$root" --output "$work/caddy" >build.log 2>&1; then
	# go get asks the module proxy for the module's versions. For a module
	# path it does not know, proxy.golang.org answers 404 and go falls back
	# to the local replacement; a proxy that answers 403 instead stops go.
	# Pinning the zero version skips that question; the build is the same.
	if grep -q "$module/@v/list: 403" build.log; then
		echo "the module proxy refused to list $module (403: it is not published there);"
		echo "again with the version pinned: --with $module@v0.0.0-00010101000000-000000000000=$root"
		if ! "$xcaddy" build --with "$module@v0.0.0-00010101000000-000000000000=$root" \
			--output "$work/caddy" >>build.log 2>&1; then
			cat build.log
			exit 1
		fi
	else
		cat build.log
		exit 1
	fi
fi
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

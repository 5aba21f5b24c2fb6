// Command caddy is Caddy with the standard modules and caddy-sse.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-sse/caddy-sse"
)

func main() {
	caddycmd.Main()
}

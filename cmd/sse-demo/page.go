package main

import (
	"embed"
	"io/fs"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// static holds the demo page: plain HTML and JavaScript, no build step.
//
//go:embed static
var static embed.FS

func init() {
	caddy.RegisterModule(pageFS{})
}

// pageFS is the caddy.fs.sse_demo_page module: the embedded demo page as a
// file system for file_server, so that Caddy serves it as it serves any file
// (content type, ETag, conditional requests).
type pageFS struct{}

// CaddyModule returns the Caddy module information.
func (pageFS) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "caddy.fs.sse_demo_page",
		New: func() caddy.Module { return new(pageFS) },
	}
}

// Open opens a file of the page.
func (pageFS) Open(name string) (fs.File, error) {
	sub, err := fs.Sub(static, "static")
	if err != nil {
		return nil, err
	}
	return sub.Open(name)
}

// UnmarshalCaddyfile accepts `sse_demo_page` with no arguments or block.
func (pageFS) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the module name
	if d.NextArg() {
		return d.ArgErr()
	}
	if d.NextBlock(0) {
		return d.Err("sse_demo_page takes no block")
	}
	return nil
}

// Interface guards
var (
	_ fs.FS                 = pageFS{}
	_ caddyfile.Unmarshaler = pageFS{}
)

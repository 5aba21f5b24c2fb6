// Command go publishes one event to a caddy-sse channel with go-redis:
//
//	go run ./examples/publishers/go user:42 '{"text":"hello"}'       # fire and forget
//	go run ./examples/publishers/go -r user:42 '{"text":"hello"}'    # resumable; prints the id
//
// -redis (default $REDIS_URL, then redis://127.0.0.1:6379) says which Redis.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/redis/go-redis/v9"
)

func main() {
	def := os.Getenv("REDIS_URL")
	if def == "" {
		def = "redis://127.0.0.1:6379"
	}
	url := flag.String("redis", def, "Redis `url`")
	resumable := flag.Bool("r", false, "publish a resumable event (FCALL sse_publish) and print its id")
	flag.Usage = func() {
		fmt.Fprintln(flag.CommandLine.Output(), "usage: go run ./examples/publishers/go [-redis url] [-r] <channel> <payload>")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 2 {
		flag.Usage()
		os.Exit(2)
	}
	channel, payload := flag.Arg(0), flag.Arg(1)

	opts, err := redis.ParseURL(*url)
	if err != nil {
		fmt.Fprintln(os.Stderr, "publish: -redis:", err)
		os.Exit(2)
	}
	rdb := redis.NewClient(opts)
	defer rdb.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	if *resumable {
		// Caddy installs the sse_publish function when a config uses
		// `history`; it returns the event's id.
		id, err := rdb.FCall(ctx, "sse_publish", []string{channel}, payload).Result()
		if err != nil {
			fmt.Fprintln(os.Stderr, "publish:", err)
			os.Exit(1)
		}
		fmt.Println(id)
		return
	}
	// Fire and forget: every stream on the channel gets it now, nobody later.
	n, err := rdb.Publish(ctx, channel, payload).Result()
	if err != nil {
		fmt.Fprintln(os.Stderr, "publish:", err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "received by %d Caddy instance(s)\n", n)
}

package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// publisher sends one payload to a channel.
type publisher interface {
	publish(ctx context.Context, channel string, payload []byte) error
	close()
}

// newPublisher returns a Redis PUBLISH publisher for a redis:// URL, or an
// HTTP POST publisher for an http:// URL template with {ch}.
func newPublisher(spec string, workers int) (publisher, error) {
	switch {
	case strings.HasPrefix(spec, "redis://"):
		opts, err := redis.ParseURL(spec)
		if err != nil {
			return nil, err
		}
		opts.PoolSize = workers
		opts.MinIdleConns = workers
		return &redisPub{c: redis.NewClient(opts)}, nil
	case strings.HasPrefix(spec, "http://"):
		if !strings.Contains(spec, "{ch}") {
			return nil, fmt.Errorf("-pub %q: the URL has no {ch} for the channel", spec)
		}
		if _, err := url.Parse(strings.ReplaceAll(spec, "{ch}", "x")); err != nil {
			return nil, err
		}
		tr := &http.Transport{
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
			MaxIdleConns:        workers,
			MaxIdleConnsPerHost: workers,
			IdleConnTimeout:     30 * time.Second,
		}
		return &httpPub{tmpl: spec, c: &http.Client{Transport: tr, Timeout: 10 * time.Second}}, nil
	}
	return nil, fmt.Errorf("-pub %q: want redis://host:port or http://host:port/path/{ch}", spec)
}

type redisPub struct{ c *redis.Client }

func (p *redisPub) publish(ctx context.Context, channel string, payload []byte) error {
	return p.c.Publish(ctx, channel, payload).Err()
}

func (p *redisPub) close() { _ = p.c.Close() }

type httpPub struct {
	tmpl string
	c    *http.Client
}

func (p *httpPub) publish(ctx context.Context, channel string, payload []byte) error {
	u := strings.ReplaceAll(p.tmpl, "{ch}", url.PathEscape(channel))
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(payload))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "text/plain")
	resp, err := p.c.Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("publish: status %d", resp.StatusCode)
	}
	return nil
}

func (p *httpPub) close() { p.c.CloseIdleConnections() }

// pubResult is how a publish phase went.
type pubResult struct {
	published int64
	errors    int64
	firstErr  error
	elapsed   time.Duration
}

// publishPaced publishes events payloads at rate per second through workers
// goroutines, event i going to channelOf(i). Each payload carries the time
// just before its publish on c's clock. It stops after all events or when
// ctx ends.
func publishPaced(ctx context.Context, c *client, pub publisher, events int, rate float64, workers, size int,
	channelOf func(int) string) pubResult {
	jobs := make(chan int, workers)
	var published, failed atomic.Int64
	var errOnce sync.Once
	var firstErr error
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var buf []byte
			for i := range jobs {
				buf = appendPayload(buf[:0], c.now(), size)
				pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				err := pub.publish(pctx, channelOf(i), buf)
				cancel()
				if err != nil {
					failed.Add(1)
					errOnce.Do(func() { firstErr = err })
					continue
				}
				published.Add(1)
			}
		}()
	}
	start := time.Now()
	next := 0
pace:
	for next < events {
		due := events
		if rate > 0 {
			due = min(events, 1+int(time.Since(start).Seconds()*rate))
		}
		for ; next < due; next++ {
			select {
			case jobs <- next:
			case <-ctx.Done():
				break pace
			}
		}
		if next < events {
			wait := time.Duration(float64(next)/rate*float64(time.Second)) - time.Since(start)
			if wait > 0 {
				select {
				case <-time.After(wait):
				case <-ctx.Done():
					break pace
				}
			}
		}
	}
	close(jobs)
	wg.Wait()
	return pubResult{published: published.Load(), errors: failed.Load(), firstErr: firstErr, elapsed: time.Since(start)}
}

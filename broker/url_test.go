package broker

import (
	"strings"
	"testing"
	"time"
)

func TestParseURL(t *testing.T) {
	o, err := ParseURL("rediss://user:s3cret@cache.example:6380/2?dial_timeout=3s&client_name=sse")
	if err != nil {
		t.Fatal(err)
	}
	if len(o.Addrs) != 1 || o.Addrs[0] != "cache.example:6380" || o.Username != "user" || o.Password != "s3cret" ||
		o.DB != 2 || o.DialTimeout != 3*time.Second || o.ClientName != "sse" {
		t.Fatalf("parsed %+v", o)
	}
	if o.TLSConfig == nil || o.TLSConfig.ServerName != "cache.example" {
		t.Fatalf("rediss:// without TLS to cache.example: %+v", o.TLSConfig)
	}

	o, err = ParseURL("redis://:only-password@10.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	if o.Addrs[0] != "10.0.0.1:6379" || o.Password != "only-password" || o.Username != "" || o.DB != 0 || o.TLSConfig != nil {
		t.Fatalf("parsed %+v", o)
	}

	for _, tc := range []struct{ url, want string }{
		{"", "empty"},
		{"localhost:6379", "scheme"},
		{"http://host", `scheme "http"`},
		{"unix://redis.sock", `scheme "unix"`},
		{"127.0.0.1:6379", "redis URL"},
		{"redis://", "no host"},
		{"redis://host/notanumber", "invalid database"},
		{"redis://host/1/2", "invalid URL path"},
		{"redis://host?bogus=1", "unexpected option: bogus"},
		{"redis://host?dial_timeout=soon", "dial_timeout"},
		{"redis://user:hunter2@host:port", "redis URL"},
		{"redis://user:hunter2@host/x", "invalid database"},
	} {
		_, err := ParseURL(tc.url)
		if err == nil {
			t.Errorf("ParseURL(%q) succeeded", tc.url)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseURL(%q) = %q, want it to mention %q", tc.url, err, tc.want)
		}
		if strings.Contains(err.Error(), "hunter2") {
			t.Errorf("ParseURL(%q) error repeats the password: %q", tc.url, err)
		}
	}
}

package broker

import (
	"errors"
	"fmt"
	"net/url"

	"github.com/redis/go-redis/v9"
)

const urlForm = "want redis://[[user]:password@]host[:port][/db], or rediss:// for TLS"

// ParseURL parses a redis:// or rediss:// (TLS) URL into options for New:
//
//	redis://[[user]:password@]host[:port][/db][?option=value...]
//
// The port defaults to 6379, the database to 0. The query options are
// go-redis's (dial_timeout, read_timeout, pool_size, protocol, skip_verify,
// ...). Errors never repeat the password.
func ParseURL(rawurl string) (*redis.UniversalOptions, error) {
	if rawurl == "" {
		return nil, errors.New("redis URL: empty")
	}
	u, err := url.Parse(rawurl)
	if err != nil {
		// url.Error repeats the whole URL, password included: keep only why.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, fmt.Errorf("redis URL: %w (%s)", err, urlForm)
	}
	shown := rawurl
	if _, ok := u.User.Password(); ok {
		shown = u.Redacted()
	}
	switch u.Scheme {
	case "redis", "rediss":
	case "":
		return nil, fmt.Errorf("redis URL %q: no scheme (%s)", shown, urlForm)
	default:
		return nil, fmt.Errorf("redis URL %q: scheme %q (%s)", shown, u.Scheme, urlForm)
	}
	if u.Host == "" {
		return nil, fmt.Errorf("redis URL %q: no host", shown)
	}
	o, err := redis.ParseURL(rawurl)
	if err != nil {
		return nil, fmt.Errorf("redis URL %q: %w", shown, err)
	}
	return &redis.UniversalOptions{
		Addrs:                   []string{o.Addr},
		ClientName:              o.ClientName,
		DB:                      o.DB,
		Protocol:                o.Protocol,
		Username:                o.Username,
		Password:                o.Password,
		MaxRetries:              o.MaxRetries,
		MinRetryBackoff:         o.MinRetryBackoff,
		MaxRetryBackoff:         o.MaxRetryBackoff,
		DialTimeout:             o.DialTimeout,
		ReadTimeout:             o.ReadTimeout,
		WriteTimeout:            o.WriteTimeout,
		PoolFIFO:                o.PoolFIFO,
		PoolSize:                o.PoolSize,
		MaxConcurrentDials:      o.MaxConcurrentDials,
		PoolTimeout:             o.PoolTimeout,
		MinIdleConns:            o.MinIdleConns,
		MaxIdleConns:            o.MaxIdleConns,
		MaxActiveConns:          o.MaxActiveConns,
		ConnMaxIdleTime:         o.ConnMaxIdleTime,
		ConnMaxLifetime:         o.ConnMaxLifetime,
		ConnMaxLifetimeJitter:   o.ConnMaxLifetimeJitter,
		PipelinePoolSize:        o.PipelinePoolSize,
		PipelineReadBufferSize:  o.PipelineReadBufferSize,
		PipelineWriteBufferSize: o.PipelineWriteBufferSize,
		TLSConfig:               o.TLSConfig,
	}, nil
}

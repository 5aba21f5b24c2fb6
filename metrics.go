package caddysse

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// The collectors are created once per process and registered in the
// registry of every config that uses the module (Caddy makes a new registry
// per config load, so each Provision registers them again).
var metrics = struct {
	streamsOpen     prometheus.Gauge
	streamsRejected *prometheus.CounterVec
	streamsClosed   *prometheus.CounterVec
	delivered       prometheus.Counter
	dropped         *prometheus.CounterVec
	faults          *prometheus.CounterVec
	received        prometheus.Counter
	redisConnected  prometheus.Gauge
	redisReconnects prometheus.Counter
	channels        prometheus.Gauge
	published       *prometheus.CounterVec
	rejected        *prometheus.CounterVec

	presenceFailures prometheus.Counter
	lifecycleDropped *prometheus.CounterVec
}{
	streamsOpen: prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "sse", Name: "streams_open",
		Help: "Event streams currently open.",
	}),
	streamsRejected: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse", Name: "streams_rejected_total",
		Help: "Stream requests refused before the stream opened, by reason.",
	}, []string{"reason"}),
	streamsClosed: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse", Name: "streams_closed_total",
		Help: "Streams ended, by reason.",
	}, []string{"reason"}),
	delivered: prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse", Name: "events_delivered_total",
		Help: "Events written to clients.",
	}),
	dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse", Name: "events_dropped_total",
		Help: "Events not delivered to a stream, by reason.",
	}, []string{"reason"}),
	faults: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse", Name: "message_faults_total",
		Help: "Published messages that needed repair before delivery, by reason.",
	}, []string{"reason"}),
	received: prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse", Name: "redis_messages_received_total",
		Help: "Messages read from the Redis subscription connection.",
	}),
	redisConnected: prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "sse", Name: "redis_connected",
		Help: "1 while the Redis subscription connection is up.",
	}),
	redisReconnects: prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse", Name: "redis_reconnects_total",
		Help: "Times the Redis subscription connection was re-established.",
	}),
	channels: prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "sse", Name: "channels_subscribed",
		Help: "Redis channels currently subscribed.",
	}),
	published: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse", Name: "published_total",
		Help: "Messages published through sse_publish, by result.",
	}, []string{"result"}),
	rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse", Name: "messages_rejected_total",
		Help: "Messages from Redis refused as resumable frames, by reason: forged_frame (a plain PUBLISH carrying the resumable marker, delivered as plain data) or bad_frame.",
	}, []string{"reason"}),
	presenceFailures: prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse", Name: "presence_flush_failures_total",
		Help: "Presence writes to Redis that failed (they are retried).",
	}),
	lifecycleDropped: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse", Name: "lifecycle_dropped_total",
		Help: "Lifecycle entries not written to Redis, by reason: queue_full, redis (the write failed) or stopped.",
	}, []string{"reason"}),
}

func registerMetrics(reg prometheus.Registerer) error {
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{
		metrics.streamsOpen, metrics.streamsRejected, metrics.streamsClosed,
		metrics.delivered, metrics.dropped, metrics.faults, metrics.received,
		metrics.redisConnected, metrics.redisReconnects, metrics.channels,
		metrics.published, metrics.rejected,
		metrics.presenceFailures, metrics.lifecycleDropped,
	} {
		if err := reg.Register(c); err != nil {
			var already prometheus.AlreadyRegisteredError
			if !errors.As(err, &already) {
				return err
			}
		}
	}
	return nil
}

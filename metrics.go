package caddysse

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-sse/caddy-sse/broker"
)

// collectors are the module's Prometheus collectors. They are created once
// per process (see process) and registered in the registry of every config
// that uses the module (Caddy makes a new registry per config load, so each
// Provision registers them again).
type collectors struct {
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
}

func newCollectors() *collectors {
	m := &collectors{
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
	// Every reason is exported from the start, at 0, so that an alert on
	// its rate has a series to look at before the first drop.
	for _, r := range []string{broker.DropQueueFull, broker.DropRedis, broker.DropStopped} {
		m.lifecycleDropped.WithLabelValues(r)
	}
	return m
}

// register registers the collectors in reg, where they may be already.
func (m *collectors) register(reg prometheus.Registerer) error {
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{
		m.streamsOpen, m.streamsRejected, m.streamsClosed,
		m.delivered, m.dropped, m.faults, m.received,
		m.redisConnected, m.redisReconnects, m.channels,
		m.published, m.rejected,
		m.presenceFailures, m.lifecycleDropped,
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

"""Publish to caddy-sse channels from Python with redis-py (pip install redis)."""

import json
import os

import redis

r = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))

# Fire and forget: every stream on user:42 gets it now, nobody later.
r.publish("user:42", json.dumps({"text": "hello"}))

# Resumable (the Caddyfile has `history`): returns the event's id, and a
# client that reconnects with Last-Event-ID gets it even if it was away.
event_id = r.fcall("sse_publish", 1, "user:42", json.dumps({"text": "hello again"}))
print("published", event_id)

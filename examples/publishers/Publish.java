// Publish to caddy-sse channels from Java with Jedis (redis.clients:jedis 5.x).
//
// With Spring Data Redis the same two calls are
//   redisTemplate.convertAndSend("user:42", payload);
//   redisTemplate.execute((RedisCallback<Object>) c -> c.execute("FCALL",
//       "sse_publish".getBytes(), "1".getBytes(), "user:42".getBytes(), payload.getBytes()));

import java.util.List;

import redis.clients.jedis.JedisPooled;

public class Publish {
    public static void main(String[] args) {
        String url = System.getenv().getOrDefault("REDIS_URL", "redis://127.0.0.1:6379");
        try (JedisPooled redis = new JedisPooled(java.net.URI.create(url))) {
            // Fire and forget: every stream on user:42 gets it now, nobody later.
            redis.publish("user:42", "{\"text\":\"hello\"}");

            // Resumable (the Caddyfile has `history`): returns the event's id.
            Object id = redis.fcall("sse_publish", List.of("user:42"), List.of("{\"text\":\"hello again\"}"));
            System.out.println("published " + id);
        }
    }
}

<?php
// Publish to caddy-sse channels from PHP with phpredis (pecl install redis).

$redis = new Redis();
$redis->connect('127.0.0.1', 6379);

// Fire and forget: every stream on user:42 gets it now, nobody later.
$redis->publish('user:42', json_encode(['text' => 'hello']));

// Resumable (the Caddyfile has `history`): returns the event's id.
$id = $redis->rawCommand('FCALL', 'sse_publish', 1, 'user:42', json_encode(['text' => 'hello again']));
echo "published $id\n";

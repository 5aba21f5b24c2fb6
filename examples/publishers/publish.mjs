// Publish to caddy-sse channels from Node.js with node-redis (npm install redis).
import { createClient } from "redis";

const client = createClient({ url: process.env.REDIS_URL ?? "redis://127.0.0.1:6379" });
client.on("error", (err) => console.error("redis:", err));
await client.connect();

// Fire and forget: every stream on user:42 gets it now, nobody later.
await client.publish("user:42", JSON.stringify({ text: "hello" }));

// Resumable (the Caddyfile has `history`): returns the event's id.
const id = await client.sendCommand(["FCALL", "sse_publish", "1", "user:42", JSON.stringify({ text: "hello again" })]);
console.log("published", id);

await client.quit();

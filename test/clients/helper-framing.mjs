// The browser helper's fetch transport in Node.js (which has fetch but no
// EventSource) against a server that sends hand-made bytes, for
// helper_test.go: framing as the WHATWG standard says (BOM, comments, CR,
// LF and CRLF split across reads, a UTF-8 character split across reads, an
// id with NUL, an id alone, a field without a colon, an unfinished event at
// the end), then `retry:` and Last-Event-ID on the reconnect, and 204.
// Then a server that answers 503: the helper tries again, after the
// Retry-After it sends and doubling its own delay, and stops ("lost") after
// maxRetries failures in a row.
// It prints one JSON line: what the page would have seen.
import { createServer } from "node:http";
import { openStream } from "../../client/caddy-sse.js";

const chunks = [
  Buffer.from("\uFEFF:a comment\n"),
  Buffer.from("retry: 50\n"),
  Buffer.from("id: 1\r"), // CR here, LF in the next read
  Buffer.from("\ndata: a\r\n\r\n"),
  Buffer.from("event: x\rdata:  b\rdata:c\r\r"), // lone CRs
  Buffer.from([0x64, 0x61, 0x74, 0x61, 0x3a, 0x20, 0xc3]), // "data: " and half of é
  Buffer.from([0xa9, 0x0a, 0x0a]),
  Buffer.from("id: 2\0z\ndata: nul\n\n"), // an id with NUL is ignored
  Buffer.from("data\n\n"), // no colon: empty data, still an event
  Buffer.from("id: 3\n\n"), // an id alone: no event, but the last id
  Buffer.from("data: unfinished"), // no blank line: never dispatched
];

const requests = [];
const server = createServer(async (req, res) => {
  requests.push({ t: Date.now(), lastEventId: req.headers["last-event-id"] ?? "", accept: req.headers.accept });
  if (requests.length > 1) {
    res.writeHead(204).end();
    return;
  }
  res.writeHead(200, { "Content-Type": "text/event-stream; charset=utf-8" });
  for (const c of chunks) {
    res.write(c);
    await new Promise((r) => setTimeout(r, 20));
  }
  res.end();
});
await new Promise((r) => server.listen(0, "127.0.0.1", r));
const url = `http://127.0.0.1:${server.address().port}/events`;

const events = [];
let endedAt = 0;
const stream = openStream(url, {
  retry: 5000, // the server's retry: 50 must win
  on: {
    message: (e) => events.push(e),
    x: (e) => events.push(e),
  },
  onStateChange: (s) => {
    if (s === "reconnecting") endedAt = Date.now();
  },
});
const timeout = setTimeout(() => stream.close(), 10_000);
const end = await stream.ended;
clearTimeout(timeout);
server.close();

// 503 with Retry-After: 1 the first time, without it after.
const busy = [];
const busyServer = createServer((req, res) => {
  busy.push(Date.now());
  res.writeHead(503, busy.length === 1 ? { "Retry-After": "1" } : {}).end("busy");
});
await new Promise((r) => busyServer.listen(0, "127.0.0.1", r));
const retried = openStream(`http://127.0.0.1:${busyServer.address().port}/events`, { retry: 100, maxRetries: 3 });
const busyTimeout = setTimeout(() => retried.close(), 10_000);
const busyEnd = await retried.ended;
clearTimeout(busyTimeout);
busyServer.close();

process.stdout.write(
  JSON.stringify({
    kind: "result",
    transport: stream.transport,
    events,
    end: { reason: end.reason, status: end.status ?? 0 },
    requests,
    reconnectAfterMs: requests.length > 1 ? requests[1].t - endedAt : -1,
    busy: {
      gaps: busy.slice(1).map((t, i) => t - busy[i]),
      end: { reason: busyEnd.reason, status: busyEnd.status ?? 0, body: busyEnd.response ? await busyEnd.response.text() : "" },
    },
  }) + "\n",
);

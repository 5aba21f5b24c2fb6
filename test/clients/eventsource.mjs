// Runs the npm package `eventsource` (5.x, the WHATWG EventSource for
// Node.js) against a URL and prints what it sees as JSON lines, for
// clients_test.go:
//
//   node eventsource.mjs <url> [<event type>...]
//
// {"kind":"connect","n":1,"lastEventId":null}   each request, with the Last-Event-ID it sends
// {"kind":"open"}
// {"kind":"event","type":"chat","data":"…","lastEventId":"…"}
// {"kind":"error","readyState":0,"code":…,"message":"…"}
//
// It stops when its standard input closes.
import { EventSource } from "eventsource";

const [url, ...types] = process.argv.slice(2);
const out = (o) => process.stdout.write(JSON.stringify({ ...o, t: Date.now() }) + "\n");

let n = 0;
const es = new EventSource(url, {
  // The package's own fetch, wrapped to see the headers of every
  // (re)connection.
  fetch: (input, init) => {
    const headers = new Headers(init?.headers);
    // The package sends the id's UTF-8 bytes, as a header carries them;
    // decode them back to compare with the event's id.
    const sent = headers.get("last-event-id");
    const lastEventId = sent === null ? null : Buffer.from(sent, "latin1").toString("utf8");
    out({ kind: "connect", n: ++n, lastEventId });
    return fetch(input, init);
  },
});
es.onopen = () => out({ kind: "open" });
es.onerror = (e) => out({ kind: "error", readyState: es.readyState, code: e?.code ?? null, message: e?.message ?? "" });
const onEvent = (e) => out({ kind: "event", type: e.type, data: e.data, lastEventId: e.lastEventId });
es.addEventListener("message", onEvent);
for (const type of types) es.addEventListener(type, onEvent);

process.stdin.on("end", () => {
  es.close();
  process.exit(0);
});
process.stdin.resume();

// Runs the npm package `@microsoft/fetch-event-source` (2.x) with POST,
// headers and a JSON body, and prints what it sees as JSON lines, for
// clients_test.go:
//
//   node fetch-event-source.mjs <url> <bearer token> <json body>
//
// {"kind":"connect","n":1,"lastEventId":null,"method":"POST"}
// {"kind":"open","status":200,"contentType":"text/event-stream; charset=utf-8"}
// {"kind":"event","type":"chunk","data":"…","id":"…"}
// {"kind":"close"}                      the server ended the stream (it reconnects)
// {"kind":"fatal","message":"…"}        a refused stream (it does not retry)
//
// It stops when its standard input closes.

// fetch-event-source is written for browsers: it calls window.fetch,
// window.setTimeout and window.clearTimeout, and listens to document's
// visibilitychange. Node.js has fetch and timers as globals; this is the
// whole shim.
globalThis.window = globalThis;
globalThis.document = {
  hidden: false,
  addEventListener() {},
  removeEventListener() {},
};
const { fetchEventSource } = await import("@microsoft/fetch-event-source");

const [url, token, body] = process.argv.slice(2);
const out = (o) => process.stdout.write(JSON.stringify({ ...o, t: Date.now() }) + "\n");

class RetriableError extends Error {}
class FatalError extends Error {}

const ctrl = new AbortController();
process.stdin.on("end", () => {
  ctrl.abort();
  process.exit(0);
});
process.stdin.resume();

let n = 0;
try {
  await fetchEventSource(url, {
    method: "POST",
    headers: {
      Authorization: `Bearer ${token}`,
      "Content-Type": "application/json",
    },
    body,
    signal: ctrl.signal,
    openWhenHidden: true,
    fetch: (input, init) => {
      out({ kind: "connect", n: ++n, lastEventId: init.headers["last-event-id"] ?? null, method: init.method });
      return fetch(input, init);
    },
    async onopen(res) {
      const contentType = res.headers.get("content-type") ?? "";
      out({ kind: "open", status: res.status, contentType });
      if (res.status === 200 && contentType.startsWith("text/event-stream")) return;
      throw new FatalError(`status ${res.status}: ${(await res.text()).trim()}`);
    },
    onmessage(ev) {
      out({ kind: "event", type: ev.event, data: ev.data, id: ev.id, retry: ev.retry ?? null });
    },
    onclose() {
      // The server ended the stream: reconnect (with Last-Event-ID),
      // as the package's README recommends.
      out({ kind: "close" });
      throw new RetriableError("closed by the server");
    },
    onerror(err) {
      if (err instanceof FatalError) throw err; // stop
      // undefined: wait the server's retry interval, then reconnect.
      return undefined;
    },
  });
} catch (err) {
  out({ kind: "fatal", message: String(err.message ?? err) });
}

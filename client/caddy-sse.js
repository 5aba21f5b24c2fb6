// caddy-sse.js: a browser helper for the event streams of caddy-sse.
//
// One ES module with no dependencies and no build step. Copy it next to your
// pages, or serve it from this repository with Caddy's file_server. It wraps
// the browser's EventSource (GET) or a fetch-based stream (POST, headers, a
// body) and acts on what caddy-sse sends:
//
//   event sse-missed   the server cannot prove the resume gapless: onMissed
//   event sse-evicted  a newer stream of the same user replaced this one:
//                      stop, never reconnect (it would evict the next one)
//   204                every channel was closed by its publisher: stop
//   401                refresh() returns a new token (URL or headers): reconnect
//   retry:             the reconnection delay
//   any other 4xx      stop
//
// Reconnects carry the last event id: EventSource sends Last-Event-ID by
// itself, a fetch stream sends the header, and a new EventSource (after a
// token refresh) gets ?lastEventId=.
//
//   import { openStream } from "./caddy-sse.js";
//
//   const stream = openStream("/events?room=lobby", {
//     on: { chat: (e) => show(JSON.parse(e.data)) },
//     onMissed: () => reloadHistory(),
//     onEnd: ({ reason }) => console.log("stream over:", reason),
//   });
//
// The README's "Browser helper" section documents every option.

const EVICTED = "sse-evicted";
const MISSED = "sse-missed";

// A handler's return value that stops reading the stream.
const STOP = Symbol("stop");

/**
 * Opens a stream. Same as `new SseStream(url, options)`.
 * @param {string | URL} url
 * @param {object} [options]
 * @returns {SseStream}
 */
export function openStream(url, options = {}) {
  return new SseStream(url, options);
}

/**
 * One logical stream: it connects, reconnects and resumes until the server
 * says stop, the page calls close(), or it gives up.
 */
export class SseStream {
  #opts;
  #handlers = new Map(); // event type -> Set of functions
  #state = "connecting";
  #transport;
  #request; // { url, method, headers (Headers), body }
  #lastEventId;
  #retry; // ms: the `retry` option, then what the server sends
  #maxDelay;
  #maxRetries;
  #maxRefreshes;
  #failures = 0; // attempts in a row that did not open
  #refreshes = 0; // 401s in a row
  #everOpened = false;
  #noResume = false;
  #ended = false;
  #endResolve;
  #es = null;
  #esSettle = null;
  #abort = null;
  #timer = null;
  #wake = null;

  /** Resolves once the stream has stopped for good, with what onEnd gets. */
  ended;

  constructor(url, options = {}) {
    const o = { ...options };
    this.#opts = o;
    const method = String(o.method || "GET").toUpperCase();
    const headers = new Headers(o.headers || {});
    this.#request = { url: String(url), method, headers, body: o.body ?? null };
    const plain = method === "GET" && o.body == null && [...headers.keys()].length === 0;
    const hasES = typeof EventSource === "function";
    this.#transport = o.transport || (plain && hasES ? "eventsource" : "fetch");
    if (this.#transport !== "eventsource" && this.#transport !== "fetch") {
      throw new TypeError(`caddy-sse: transport must be "eventsource" or "fetch", not ${o.transport}`);
    }
    if (this.#transport === "eventsource" && (!plain || !hasES)) {
      throw new TypeError("caddy-sse: EventSource can only GET, without headers or a body: use transport \"fetch\"");
    }
    this.#lastEventId = o.lastEventId == null ? "" : String(o.lastEventId);
    this.#retry = positive(o.retry, 3000);
    this.#maxDelay = positive(o.maxRetryDelay, 30000);
    this.#maxRetries = o.maxRetries == null ? Infinity : Math.max(0, Number(o.maxRetries));
    this.#maxRefreshes = o.maxRefreshes == null ? 3 : Math.max(0, Number(o.maxRefreshes));
    this.ended = new Promise((resolve) => (this.#endResolve = resolve));
    for (const [type, fn] of Object.entries(o.on || {})) this.on(type, fn);
    this.#run();
  }

  /** "connecting", "open", "reconnecting" or "closed". */
  get state() {
    return this.#state;
  }

  /** The id of the last event received (what a reconnect resumes after). */
  get lastEventId() {
    return this.#lastEventId;
  }

  /** "eventsource" or "fetch". */
  get transport() {
    return this.#transport;
  }

  /** The URL the next connection goes to (refresh and resume change it). */
  get url() {
    return this.#request.url;
  }

  /**
   * Calls fn with {type, data, lastEventId} for every event of this type
   * ("message" for events without `event:`).
   */
  on(type, fn) {
    if (typeof fn !== "function") throw new TypeError("caddy-sse: on(type, fn) needs a function");
    type = String(type);
    if (!this.#handlers.has(type)) this.#handlers.set(type, new Set());
    this.#handlers.get(type).add(fn);
    this.#es?.addEventListener(type, this.#onESEvent);
    return this;
  }

  off(type, fn) {
    this.#handlers.get(String(type))?.delete(fn);
    return this;
  }

  /** Stops the stream for good; onEnd gets reason "closed". */
  close() {
    this.#finish("closed");
  }

  // #run makes one connection attempt after another until the stream ends.
  async #run() {
    let probe = false;
    while (!this.#ended) {
      const viaFetch = this.#transport === "fetch" || probe;
      probe = false;
      let out;
      try {
        out = viaFetch ? await this.#fetchOnce() : await this.#eventSourceOnce();
      } catch (error) {
        out = { kind: "failed", error };
      }
      if (this.#ended) return;
      switch (out.kind) {
        case "gave-up":
          // EventSource stops on any answer but a 200 event stream, and does
          // not say which: ask again with fetch, which reads the status.
          probe = true;
          break;
        case "done":
          this.#finish("done", { status: 204, response: out.response });
          return;
        case "refused":
          this.#finish("refused", { status: out.response?.status ?? 0, response: out.response, error: out.error });
          return;
        case "evicted":
          this.#finish("evicted", { data: out.data });
          return;
        case "unauthorized":
          if (!(await this.#refresh(out.response))) return;
          break;
        case "ended": // an open stream ended: resume after `retry`
        case "failed": // no answer, or a 5xx or 429 before the stream opened
          if (out.kind === "failed" && ++this.#failures > this.#maxRetries) {
            this.#finish("lost", { status: out.response?.status ?? 0, response: out.response, error: out.error });
            return;
          }
          if (this.#noResume) {
            this.#finish("lost", { error: out.error });
            return;
          }
          this.#setState("reconnecting");
          await this.#sleep(this.#delay(out.retryAfter));
          break;
      }
    }
  }

  // #delay is the pause before the next attempt: the server's `retry`, doubled
  // for each failed attempt in a row, at most maxRetryDelay (never less than
  // a Retry-After the server sent).
  #delay(retryAfter = 0) {
    let ms = this.#retry;
    if (this.#failures > 1) {
      ms = Math.min(ms * 2 ** (this.#failures - 1), Math.max(this.#maxDelay, this.#retry));
    }
    return Math.max(ms, retryAfter);
  }

  async #refresh(response) {
    const fn = this.#opts.refresh;
    this.#refreshes++;
    if (typeof fn !== "function" || this.#refreshes > this.#maxRefreshes) {
      this.#finish("unauthorized", { status: 401, response });
      return false;
    }
    this.#setState("reconnecting");
    if (this.#refreshes > 1) {
      await this.#sleep(Math.min(this.#retry * 2 ** (this.#refreshes - 2), Math.max(this.#maxDelay, this.#retry)));
      if (this.#ended) return false;
    }
    let next;
    try {
      next = await fn({
        attempt: this.#refreshes,
        status: 401,
        response,
        url: this.#request.url,
        headers: new Headers(this.#request.headers),
      });
    } catch (error) {
      this.#finish("unauthorized", { status: 401, response, error });
      return false;
    }
    if (this.#ended) return false;
    if (next == null || next === false) {
      this.#finish("unauthorized", { status: 401, response });
      return false;
    }
    if (typeof next === "string" || next instanceof URL) {
      this.#request.url = String(next);
    } else {
      if (next.url != null) this.#request.url = String(next.url);
      if (next.headers != null) {
        for (const [k, v] of new Headers(next.headers)) this.#request.headers.set(k, v);
      }
    }
    return true;
  }

  // #fetchOnce is one request, read as an event stream when it is one.
  async #fetchOnce() {
    const req = this.#request;
    const headers = new Headers(req.headers);
    if (!headers.has("Accept")) headers.set("Accept", "text/event-stream");
    if (this.#lastEventId !== "") headers.set("Last-Event-ID", this.#lastEventId);
    const esProbe = this.#transport === "eventsource";
    const ctl = new AbortController();
    this.#abort = ctl;
    let res;
    try {
      res = await fetch(req.url, {
        method: esProbe ? "GET" : req.method,
        headers,
        body: esProbe || req.method === "GET" || req.method === "HEAD" ? undefined : req.body,
        credentials: this.#opts.credentials || "same-origin",
        cache: "no-store",
        signal: ctl.signal,
      });
    } catch (error) {
      return { kind: "failed", error };
    }
    if (this.#ended) {
      ctl.abort();
      return { kind: "stopped" };
    }
    // Only a stream is aborted when the stream stops: the body of a
    // refusal stays readable for the page (onEnd's response).
    this.#abort = null;
    const status = res.status;
    if (status === 204) return { kind: "done", response: res };
    if (status === 401) return { kind: "unauthorized", response: res };
    if (status === 429 || status >= 500) {
      return { kind: "failed", response: res, retryAfter: retryAfterMs(res), error: new Error(`HTTP ${status}`) };
    }
    const type = res.headers.get("Content-Type") || "";
    if (status !== 200 || !/^text\/event-stream\b/i.test(type) || !res.body) {
      return { kind: "refused", response: res };
    }
    this.#abort = ctl;
    this.#opened(res);
    if (this.#ended) {
      ctl.abort();
      return { kind: "stopped" };
    }
    return this.#read(res.body, ctl);
  }

  async #read(body, ctl) {
    const reader = body.getReader();
    const decoder = new TextDecoder(); // UTF-8, drops a leading BOM
    const parser = new Parser(this.#lastEventId, {
      event: (type, data, id) => this.#dispatch(type, data, id),
      id: (id) => (this.#lastEventId = id),
      retry: (ms) => (this.#retry = ms),
    });
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const r = parser.feed(decoder.decode(value, { stream: true }));
        if (this.#ended) return { kind: "stopped" };
        if (r && r !== STOP) return r;
      }
      parser.feed(decoder.decode());
      return { kind: "ended" };
    } catch (error) {
      return this.#ended ? { kind: "stopped" } : { kind: "ended", error };
    } finally {
      ctl.abort();
      if (this.#abort === ctl) this.#abort = null;
    }
  }

  // #eventSourceOnce runs one EventSource until the browser gives up on it
  // or the stream ends for good. The browser reconnects by itself meanwhile.
  #eventSourceOnce() {
    return new Promise((resolve) => {
      let url = this.#request.url;
      if (this.#lastEventId !== "") {
        try {
          const u = new URL(url, globalThis.location?.href);
          u.searchParams.set("lastEventId", this.#lastEventId);
          url = u.href;
        } catch {
          // not a URL: EventSource refuses it below
        }
      }
      let es;
      try {
        es = new EventSource(url, { withCredentials: this.#opts.credentials === "include" });
      } catch (error) {
        resolve({ kind: "refused", error }); // a URL EventSource cannot open
        return;
      }
      this.#es = es;
      this.#esSettle = (out) => {
        if (this.#es === es) this.#es = null;
        this.#esSettle = null;
        es.close();
        resolve(out);
      };
      for (const type of [...this.#handlers.keys(), EVICTED, MISSED]) es.addEventListener(type, this.#onESEvent);
      es.onopen = () => {
        if (this.#es === es) this.#opened(null);
      };
      es.onerror = () => {
        if (this.#es !== es) return;
        if (es.readyState === EventSource.CLOSED) this.#esSettle({ kind: "gave-up" });
        else this.#setState("reconnecting"); // the browser retries after `retry`
      };
    });
  }

  #onESEvent = (e) => {
    if (e.target !== this.#es) return;
    // A new EventSource knows no id until the server sends one (it resumed
    // from ?lastEventId=): keep ours until then.
    const r = this.#dispatch(e.type, e.data, e.lastEventId || this.#lastEventId);
    if (r && r.kind === "evicted") this.#esSettle?.(r);
  };

  // #dispatch hands one event to the page. It returns an outcome that ends
  // the connection, or nothing.
  #dispatch(type, data, lastEventId) {
    this.#lastEventId = lastEventId;
    if (type === EVICTED) return { kind: "evicted", data };
    if (type === MISSED) {
      let after = "";
      try {
        after = String(JSON.parse(data).after ?? "");
      } catch {
        // not ours: still a warning that events may be missing
      }
      call(this.#opts.onMissed, { after, data });
      return undefined;
    }
    const ev = { type, data, lastEventId };
    for (const fn of [...(this.#handlers.get(type) || [])]) {
      call(fn, ev);
      if (this.#ended) return STOP;
    }
    return undefined;
  }

  #opened(response) {
    const reconnected = this.#everOpened;
    this.#everOpened = true;
    this.#failures = 0;
    this.#refreshes = 0;
    if (response && typeof this.#opts.resume === "function") {
      const next = call(this.#opts.resume, response);
      if (next === false) {
        this.#noResume = true;
      } else if (next) {
        const r = this.#request;
        if (next.url != null) r.url = String(next.url);
        if (next.method != null) r.method = String(next.method).toUpperCase();
        if (next.headers != null) r.headers = new Headers(next.headers);
        if ("body" in next) r.body = next.body ?? null;
      }
    }
    this.#setState("open");
    call(this.#opts.onOpen, { reconnected, response });
  }

  #setState(state) {
    if (this.#state === state || this.#state === "closed") return;
    this.#state = state;
    call(this.#opts.onStateChange, state);
  }

  #sleep(ms) {
    return new Promise((resolve) => {
      this.#wake = resolve;
      this.#timer = setTimeout(() => {
        this.#timer = null;
        this.#wake = null;
        resolve();
      }, ms);
    });
  }

  #finish(reason, info = {}) {
    if (this.#ended) return;
    this.#ended = true;
    clearTimeout(this.#timer);
    this.#wake?.();
    this.#abort?.abort();
    this.#esSettle?.({ kind: "stopped" });
    this.#setState("closed");
    const end = { reason };
    for (const [k, v] of Object.entries(info)) if (v !== undefined) end[k] = v;
    this.#endResolve(end);
    call(this.#opts.onEnd, end);
  }
}

// Parser reads text/event-stream as the WHATWG HTML standard says: lines end
// at CRLF, LF or a lone CR; comments are ignored; an event is dispatched at
// a blank line if it has data; `id` without NUL sets the last event id;
// `retry` of digits only sets the reconnection time.
class Parser {
  #lastEventId; // the last event ID buffer
  #line = ""; // an unfinished line
  #skipLF = false; // the previous chunk ended with CR
  #type = "";
  #data = "";
  #sink; // { event(type, data, lastEventId), id(lastEventId), retry(ms) }

  constructor(lastEventId, sink) {
    this.#lastEventId = lastEventId;
    this.#sink = sink;
  }

  // feed takes the next decoded text; it returns what a handler returned to
  // end the connection, if one did.
  feed(text) {
    let i = 0;
    if (this.#skipLF && text.length > 0) {
      if (text[0] === "\n") i = 1;
      this.#skipLF = false;
    }
    let start = i;
    for (; i < text.length; i++) {
      const c = text[i];
      if (c !== "\n" && c !== "\r") continue;
      const line = this.#line + text.slice(start, i);
      this.#line = "";
      if (c === "\r") {
        if (i + 1 < text.length) {
          if (text[i + 1] === "\n") i++;
        } else {
          this.#skipLF = true;
        }
      }
      start = i + 1;
      const r = this.#field(line);
      if (r) return r;
    }
    this.#line += text.slice(start);
    return undefined;
  }

  #field(line) {
    if (line === "") return this.#dispatch();
    if (line[0] === ":") return undefined;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    switch (name) {
      case "event":
        this.#type = value;
        break;
      case "data":
        this.#data += value + "\n";
        break;
      case "id":
        if (!value.includes("\0")) this.#lastEventId = value;
        break;
      case "retry":
        if (/^[0-9]+$/.test(value)) this.#sink.retry(Number(value));
        break;
    }
    return undefined;
  }

  #dispatch() {
    const type = this.#type || "message";
    const data = this.#data;
    this.#type = "";
    this.#data = "";
    this.#sink.id(this.#lastEventId);
    if (data === "") return undefined;
    return this.#sink.event(type, data.slice(0, -1), this.#lastEventId);
  }
}

function positive(v, def) {
  const n = Number(v);
  return v != null && Number.isFinite(n) && n >= 0 ? n : def;
}

// retryAfterMs reads a Retry-After of seconds (the form caddy-sse sends).
function retryAfterMs(res) {
  const v = res.headers.get("Retry-After");
  return v && /^[0-9]+$/.test(v.trim()) ? Number(v.trim()) * 1000 : 0;
}

// call runs a page's callback; an exception in it is reported as uncaught
// errors are, and never breaks the stream.
function call(fn, ...args) {
  if (typeof fn !== "function") return undefined;
  try {
    return fn(...args);
  } catch (err) {
    if (typeof globalThis.reportError === "function") globalThis.reportError(err);
    else setTimeout(() => { throw err; });
    return undefined;
  }
}

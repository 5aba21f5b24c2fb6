// Drives Debian's Chromium, headless, with playwright-core, for
// browser_test.go. It reads one JSON command a line on standard input and
// answers each with one JSON line:
//
//   {"cmd":"goto","url":"…"}                      -> {"kind":"reply","ok":true,"protocol":"h2"}
//   {"cmd":"waitState","state":"open","timeoutMs":10000}
//   {"cmd":"send","text":"…"}                     types in the page's message box and clicks Send
//   {"cmd":"waitLog","text":"…","timeoutMs":10000}
//   {"cmd":"states"}                              -> "states": every state the page showed
//   {"cmd":"log"}                                 -> "log": the lines of the page's event log
//   {"cmd":"eventsProtocol"}                      -> "protocol" of the EventSource request
//   {"cmd":"screenshot","path":"…"}
//
//   node browser.mjs [<extra Chromium argument>...]
//
// CHROMIUM overrides the browser's path (default /usr/bin/chromium).
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const out = (o) => process.stdout.write(JSON.stringify({ ...o, t: Date.now() }) + "\n");

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    ...process.argv.slice(2),
  ],
});
const page = await browser.newPage();
// Record every state the page shows (#state), however briefly.
await page.addInitScript(() => {
  window.__states = [];
  document.addEventListener("DOMContentLoaded", () => {
    const el = document.getElementById("state");
    window.__states.push(el.textContent);
    new MutationObserver((records) => {
      for (const r of records) for (const n of r.addedNodes) window.__states.push(n.textContent);
    }).observe(el, { childList: true });
  });
});
// The protocol of each response of the event stream, as the network stack
// reports it (a stream that is still open has no resource timing entry).
const eventProtocols = [];
const cdp = await page.context().newCDPSession(page);
await cdp.send("Network.enable");
cdp.on("Network.responseReceived", (e) => {
  if (new URL(e.response.url).pathname.startsWith("/events/")) eventProtocols.push(e.response.protocol);
});
const pageErrors = [];
page.on("pageerror", (err) => pageErrors.push(String(err)));

const commands = {
  async goto({ url }) {
    const res = await page.goto(url);
    const protocol = await page.evaluate(() => performance.getEntriesByType("navigation")[0].nextHopProtocol);
    return { ok: res.ok(), status: res.status(), protocol };
  },
  async waitState({ state, timeoutMs }) {
    await page.waitForFunction((s) => document.getElementById("state").textContent === s, state, {
      timeout: timeoutMs,
      polling: 20,
    });
    return { ok: true };
  },
  async send({ text }) {
    await page.fill("#text", text);
    await page.click("#publish button[type=submit]");
    return { ok: true };
  },
  async waitLog({ text, timeoutMs }) {
    await page.waitForFunction(
      (t) => [...document.querySelectorAll("#log li")].some((li) => li.textContent.includes(t)),
      text,
      { timeout: timeoutMs, polling: 20 },
    );
    return { ok: true };
  },
  async states() {
    return { ok: true, states: await page.evaluate(() => window.__states) };
  },
  async log() {
    return { ok: true, log: await page.$$eval("#log li", (lis) => lis.map((li) => li.textContent)) };
  },
  async eventsProtocol() {
    return { ok: true, protocol: eventProtocols.at(-1) ?? "" };
  },
  async screenshot({ path }) {
    await page.screenshot({ path, fullPage: true });
    return { ok: true };
  },
};

out({ kind: "ready", message: browser.version() });
const rl = createInterface({ input: process.stdin });
for await (const line of rl) {
  if (!line.trim()) continue;
  let reply;
  try {
    const cmd = JSON.parse(line);
    const fn = commands[cmd.cmd];
    if (!fn) throw new Error(`unknown command ${cmd.cmd}`);
    reply = await fn(cmd);
  } catch (err) {
    reply = { ok: false, error: String(err.message ?? err) };
  }
  if (pageErrors.length) reply.error = (reply.error ? reply.error + "; " : "") + "page errors: " + pageErrors.join("; ");
  out({ kind: "reply", ...reply });
}
await browser.close();

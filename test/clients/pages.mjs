// Drives one page in Debian's Chromium (over the DevTools protocol) or
// Firefox ESR (over WebDriver BiDi), headless, with puppeteer-core, for
// helper_test.go and live_test.go. It reads one JSON command a line on
// standard input and answers each with one JSON line:
//
//   {"cmd":"goto","url":"…"}                    -> {"ok":true,"status":200}
//   {"cmd":"call","fn":"start","args":[…]}      -> "value": what window[fn](...args) returned
//   {"cmd":"wait","expr":"…","timeoutMs":5000}  waits until the expression is truthy in the page
//   {"cmd":"eval","expr":"…"}                   -> "value" of the expression
//   {"cmd":"screenshot","path":"…"}
//   {"cmd":"authenticate","username":"…","password":"…"}   HTTP basic auth for what follows
//
//   node pages.mjs chromium|firefox
//
// CHROMIUM and FIREFOX override the browsers' paths (default
// /usr/bin/chromium, /usr/bin/firefox-esr).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import puppeteer from "puppeteer-core";

const out = (o) => process.stdout.write(JSON.stringify({ ...o, t: Date.now() }) + "\n");
const which = process.argv[2];
const profile = mkdtempSync(join(tmpdir(), `caddy-sse-${which}-`));

let launch;
if (which === "chromium") {
  launch = {
    browser: "chrome",
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    userDataDir: profile,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  };
} else if (which === "firefox") {
  launch = {
    browser: "firefox",
    protocol: "webDriverBiDi",
    executablePath: process.env.FIREFOX || "/usr/bin/firefox-esr",
    headless: true,
    userDataDir: profile,
  };
} else {
  console.error("usage: node pages.mjs chromium|firefox");
  process.exit(2);
}

const browser = await puppeteer.launch({ ...launch, timeout: 90_000, protocolTimeout: 90_000 });
const page = await browser.newPage();
const pageErrors = [];
// Uncaught exceptions in the page fail the command that follows. (Console
// errors do not: browsers log every refused request there, and the tests
// make refused requests on purpose.)
// Firefox reports an EventSource that stops on a refused request (the tests
// refuse some on purpose) as a page error: that one is expected.
const expected = /^Firefox can.t establish a connection to the server at /;
page.on("pageerror", (err) => {
  const text = String(err?.message ?? err);
  if (!expected.test(text)) pageErrors.push(text);
});

// Content-Security-Policy violations, for the tests to read: window.__csp.
await page.evaluateOnNewDocument(() => {
  window.__csp = [];
  document.addEventListener("securitypolicyviolation", (e) => window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`));
});

const commands = {
  async goto({ url }) {
    const res = await page.goto(url, { waitUntil: "load", timeout: 90_000 });
    return { ok: true, status: res ? res.status() : 0 };
  },
  async authenticate({ username, password }) {
    await page.authenticate({ username, password });
    return { ok: true };
  },
  async call({ fn, args }) {
    const value = await page.evaluate((fn, args) => window[fn](...args), fn, args ?? []);
    return { ok: true, value: value ?? null };
  },
  async eval({ expr }) {
    const value = await page.evaluate(expr);
    return { ok: true, value: value ?? null };
  },
  async wait({ expr, timeoutMs }) {
    await page.waitForFunction(expr, { timeout: timeoutMs ?? 10_000, polling: 50 });
    return { ok: true };
  },
  async screenshot({ path }) {
    await page.screenshot({ path, fullPage: true });
    return { ok: true };
  },
};

out({ kind: "ready", message: await browser.version() });
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
    reply = { ok: false, error: String(err?.message ?? err) };
  }
  const errors = pageErrors.splice(0);
  if (errors.length) reply.pageErrors = errors;
  out({ kind: "reply", ...reply });
}
await browser.close();
rmSync(profile, { recursive: true, force: true });

// Headless Chromium against the running example (Caddy in front of the app),
// run by TestBrowser and TestBrowserResumes in app/main_test.go, which start
// everything and pass:
//   BASE_URL       Caddy's address
//   SCENARIO       "answer" (the answer, then no session) or "resume" (Caddy
//                  closes every stream after about 1.5 s)
//   QUESTION       what to ask
//   EXPECTED       the full answer the app will type
//   CHROMIUM_PATH  the browser (default /usr/bin/chromium)
//   SCREENSHOT     optional: a PNG of the page after the answer is written here
import { chromium } from "playwright-core";

const env = (name, def) => {
  const v = process.env[name] ?? def;
  if (v === undefined) throw new Error(`${name} is not set (this script is run by app/main_test.go)`);
  return v;
};
const base = env("BASE_URL");
const question = env("QUESTION");
const expected = env("EXPECTED");
// How long the page must stay quiet after done: an EventSource-like
// reconnect loop would retry within a few seconds.
const QUIET_MS = 4000;

function fail(msg) {
  throw new Error(msg);
}

const browser = await chromium.launch({
  executablePath: env("CHROMIUM_PATH", "/usr/bin/chromium"),
  // Without the background-networking flags, Chromium's own connections
  // fail here and the page's are refused.
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
  timeout: 60_000,
});
try {
  const scenario = env("SCENARIO", "answer");
  if (scenario === "answer") {
    await answersInOrder(await browser.newContext());
    await refusedWithoutSession(await browser.newContext());
  } else if (scenario === "resume") {
    await resumesAfterDrops(await browser.newContext());
  } else {
    fail(`unknown SCENARIO ${scenario}`);
  }
  console.log("browser: ok");
} finally {
  await browser.close();
}

// chatRequests counts the page's requests to /chat and /chat/<id>, with the
// time each was made.
function chatRequests(page) {
  const seen = [];
  page.on("request", (req) => {
    const path = new URL(req.url()).pathname;
    if (path === "/chat" || path.startsWith("/chat/")) {
      seen.push({ at: Date.now(), method: req.method(), path, lastEventId: req.headers()["last-event-id"] ?? "" });
    }
  });
  return seen;
}

// recordTyping records every state of the answer and of the status line.
async function recordTyping(page) {
  await page.evaluate(() => {
    window.__typed = [];
    window.__status = [];
    const answer = document.getElementById("answer");
    const status = document.getElementById("status");
    new MutationObserver(() => window.__typed.push(answer.textContent))
      .observe(answer, { childList: true, characterData: true, subtree: true });
    new MutationObserver(() => window.__status.push(status.textContent))
      .observe(status, { childList: true, characterData: true, subtree: true });
  });
}

// typedInOrder checks the answer the page shows and every state it went
// through: each a prefix of the expected answer (nothing lost, nothing
// twice), many of them (a typewriter). It returns the number of states.
async function typedInOrder(page) {
  const text = await page.textContent("#answer");
  if (text !== expected) fail(`the page shows\n${JSON.stringify(text)}\nwant\n${JSON.stringify(expected)}`);
  const states = (await page.evaluate(() => window.__typed)).filter((s) => s !== "");
  for (const s of states) {
    if (!expected.startsWith(s)) fail(`the answer went out of order: ${JSON.stringify(s)}`);
  }
  // Chunks of 1-3 characters: a typewriter shows many states, not one.
  if (states.length < expected.length / 4) fail(`only ${states.length} states typed for ${expected.length} characters`);
  return states.length;
}

async function answersInOrder(context) {
  const page = await context.newPage();
  page.setDefaultTimeout(60_000);
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  const requests = chatRequests(page);
  await page.goto(base + "/");

  await recordTyping(page);
  await page.fill("#question", question);
  await page.click("#send");

  await page.waitForSelector('#status[data-state="done"], #status[data-state="error"]', { timeout: 60_000 });
  const doneAt = Date.now();
  const status = await page.textContent("#status");
  if ((await page.getAttribute("#status", "data-state")) !== "done") fail(`the page says: ${status}`);
  const steps = await typedInOrder(page);

  if (process.env.SCREENSHOT) await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });

  await page.waitForTimeout(QUIET_MS);
  const after = requests.filter((r) => r.at > doneAt);
  if (after.length > 0) fail(`requests after done (a reconnect loop): ${JSON.stringify(after)}`);
  if (requests.length !== 1 || requests[0].method !== "POST") fail(`chat requests ${JSON.stringify(requests)}, want one POST`);
  if (errors.length > 0) fail(`page errors: ${errors.join("; ")}`);
  console.log(`browser: typed ${expected.length} characters in ${steps} steps; quiet for ${QUIET_MS} ms after done`);
  await context.close();
}

// Caddy closes the stream every 1.5 s: the page shows "Reconnecting…",
// resumes on GET /chat/<id> with the last event id it saw, and the answer is
// whole, in order; after done nothing reconnects.
async function resumesAfterDrops(context) {
  const page = await context.newPage();
  page.setDefaultTimeout(60_000);
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  const requests = chatRequests(page);
  await page.goto(base + "/");
  await recordTyping(page);
  await page.fill("#question", question);
  await page.click("#send");

  await page.waitForSelector('#status[data-state="done"], #status[data-state="error"]', { timeout: 90_000 });
  const doneAt = Date.now();
  const status = await page.textContent("#status");
  if ((await page.getAttribute("#status", "data-state")) !== "done") fail(`the page says: ${status}`);
  const steps = await typedInOrder(page);

  const shown = await page.evaluate(() => window.__status);
  if (!shown.includes("Reconnecting…")) fail(`the status never said Reconnecting…: ${JSON.stringify(shown)}`);
  const [first, ...resumes] = requests;
  if (first?.method !== "POST" || first.path !== "/chat") fail(`first request ${JSON.stringify(first)}, want POST /chat`);
  if (resumes.length === 0) fail("no resume: the stream was never closed?");
  for (const r of resumes) {
    if (r.method !== "GET" || !/^\/chat\/[0-9a-f]{24}$/.test(r.path) || !/^[0-9]+$/.test(r.lastEventId)) {
      fail(`resumed with ${JSON.stringify(r)}, want GET /chat/<id> with a Last-Event-ID`);
    }
  }
  await page.waitForTimeout(QUIET_MS);
  const after = requests.filter((r) => r.at > doneAt);
  if (after.length > 0) fail(`requests after done (a reconnect loop): ${JSON.stringify(after)}`);
  if (errors.length > 0) fail(`page errors: ${errors.join("; ")}`);
  console.log(`browser: typed ${expected.length} characters in ${steps} steps over ${requests.length} requests (${resumes.length} resumes); quiet after done`);
  await context.close();
}

// Without the session cookie the page shows the app's own 401 and does not
// retry it.
async function refusedWithoutSession(context) {
  const page = await context.newPage();
  page.setDefaultTimeout(30_000);
  const requests = chatRequests(page);
  await page.goto(base + "/");
  await context.clearCookies();
  await page.fill("#question", question);
  await page.click("#send");
  await page.waitForSelector('#status[data-state="error"]');
  const status = await page.textContent("#status");
  if (!status.includes("401") || !status.includes("Please sign in")) fail(`without a session the page says: ${status}`);
  if ((await page.textContent("#answer")) !== "") fail("an answer appeared without a session");
  await page.waitForTimeout(1000);
  if (requests.length !== 1) fail(`chat requests without a session ${JSON.stringify(requests)}, want one`);
  console.log("browser: without a session the page shows the app's 401 and stops");
  await context.close();
}

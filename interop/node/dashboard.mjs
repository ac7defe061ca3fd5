// The web dashboard as its user meets it, in a real browser: Debian's headless Chromium driven
// by playwright-core. Signs in, turns on two-step verification, signs in again with a code,
// connects the demo provider through its consent page, approves an agent's critical request
// with step-up, finds the release in the activity page, and disconnects.
//
// The Rust test (crates/cli/tests/it/dashboard_e2e.rs) owns the server's clock and plays the
// agent. This script asks it for those over a line protocol: one JSON request per line on
// stdout, one JSON answer per line on stdin (logs go to stderr):
//   {"need":"totp","secret":"BASE32"} -> {"code":"123456"}  (the clock moves to a new 30 s step)
//   {"need":"agent","scope":"repo:read"} -> {"status":403,"error":"authorization_pending",
//        "approval_id":"apr_…"} | {"status":200,"token_ok":true,"token":…} | {"status":401,…}
//   {"need":"step_up_window"} -> {"ok":true}  (the clock moves past the step-up window)
//   {"done":true}  (no answer; the script then exits 0)
//
// Checked on every page as it goes: each response from Latchkey's origin carries a
// Content-Security-Policy header, the browser asks nothing of another origin, no CSP violation
// is reported (console or `securitypolicyviolation`), and no page shows the password, the TOTP
// secret once it is on, or the agent's token. A full-page screenshot of each page visited goes
// to LK_SCREENSHOTS as NN-what.png. Any unexpected state: a message on stderr, a screenshot of
// where it happened, exit 1.
//
// Inputs (environment): LK_ISSUER, LK_USERNAME, LK_PASSWORD, LK_SCREENSHOTS, and LK_CHROMIUM
// (default /usr/bin/chromium).

import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { createInterface } from "node:readline";

import { chromium } from "playwright-core";

import { env } from "./common.mjs";

const issuer = new URL(env("LK_ISSUER"));
const origin = issuer.origin;
const shotsDir = env("LK_SCREENSHOTS");
mkdirSync(shotsDir, { recursive: true });

const log = (...args) => console.error(...args);
const at = (path) => new URL(path, issuer).href;

// The whole run, browser start to exit, stays under the Rust side's 120 s.
const OVERALL_MS = 90_000;
const watchdog = setTimeout(() => {
  log(`FAILED: the dashboard session took longer than ${OVERALL_MS / 1000} s`);
  process.exit(1);
}, OVERALL_MS);
watchdog.unref();

// --- the line protocol ------------------------------------------------------------------------

const answers = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

async function ask(request, ms = 20_000) {
  process.stdout.write(`${JSON.stringify(request)}\n`);
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer to ${JSON.stringify(request)} within ${ms} ms`)), ms);
  });
  try {
    const next = await Promise.race([answers.next(), late]);
    if (next.done) throw new Error(`the test closed the protocol before answering ${JSON.stringify(request)}`);
    return JSON.parse(next.value);
  } finally {
    clearTimeout(timer);
  }
}

// --- what the browser must never do -----------------------------------------------------------

const problems = [];
const pendingHeaderChecks = [];
const policies = new Set();

function watch(context) {
  // Nothing from another origin: recorded, and refused so it cannot reach the network.
  context.on("request", (req) => {
    const url = new URL(req.url());
    if ((url.protocol === "http:" || url.protocol === "https:") && url.origin !== origin) {
      problems.push(`request to another origin: ${req.method()} ${req.url()}`);
    } else if (url.protocol !== "http:" && url.protocol !== "https:" && url.protocol !== "data:") {
      problems.push(`request with an unexpected scheme: ${req.url()}`);
    }
  });
  // Every response from our origin (pages, redirects, static files) carries a CSP.
  context.on("response", (res) => {
    if (new URL(res.url()).origin !== origin) return;
    pendingHeaderChecks.push(
      res
        .allHeaders()
        .then((h) => {
          const csp = h["content-security-policy"];
          if (!csp) problems.push(`no Content-Security-Policy on ${res.status()} ${res.url()}`);
          else policies.add(csp);
        })
        .catch((e) => problems.push(`could not read the headers of ${res.url()}: ${e.message}`)),
    );
  });
}

function watchPage(page) {
  page.on("console", (msg) => {
    const text = msg.text();
    if (/Content[- ]Security[- ]Policy/i.test(text)) problems.push(`CSP violation (console): ${text}`);
    else if (msg.type() === "error" || msg.type() === "warning") log(`console ${msg.type()}: ${text}`);
  });
  page.on("pageerror", (err) => problems.push(`script error on ${page.url()}: ${err.message}`));
}

// Deviations from the page contract that do not stop the story: reported together at the end
// (and the run fails).
const deviations = [];

async function assertClean(where) {
  await Promise.all(pendingHeaderChecks.splice(0));
  if (problems.length) throw new Error(`${where}:\n  ${problems.join("\n  ")}`);
}

// --- page helpers -----------------------------------------------------------------------------

let shotNumber = 0;
let currentPage;

// Secrets no page may contain from the moment they are added: the password, the TOTP secret once
// it is on, the agent's released token.
const neverShown = new Map([["the password", env("LK_PASSWORD")]]);

async function shot(page, what) {
  const html = await page.content();
  for (const [name, value] of neverShown) {
    if (html.includes(value)) problems.push(`${page.url()} contains ${name}`);
  }
  shotNumber += 1;
  const file = join(shotsDir, `${String(shotNumber).padStart(2, "0")}-${what}.png`);
  await page.screenshot({ path: file, fullPage: true });
  log(`  ${page.url()} -> ${file}`);
  await assertClean(`on ${page.url()} (${what})`);
}

function expectPath(page, path) {
  const url = new URL(page.url());
  if (url.origin !== origin || url.pathname !== path) {
    throw new Error(`expected to be on ${path}, but the browser is on ${page.url()}`);
  }
  return url;
}

// Wait for the browser to arrive at `path` (after a click, a redirect chain…).
async function arrive(page, path) {
  try {
    await page.waitForURL((u) => u.origin === origin && u.pathname === path, { waitUntil: "load" });
  } catch (e) {
    throw new Error(`expected to arrive at ${path}, but the browser is on ${page.url()} (${e.message.split("\n")[0]})`);
  }
  // A page that arrived with an error says so in role=alert.
  const alerts = await page.getByRole("alert").allInnerTexts();
  if (alerts.some((t) => t.trim())) throw new Error(`${path} shows an error: ${alerts.join(" / ")}`);
}

async function visit(page, path) {
  const res = await page.goto(at(path));
  if (!res || res.status() !== 200) throw new Error(`GET ${path}: ${res ? res.status() : "no response"}`);
  expectPath(page, new URL(at(path)).pathname);
}

async function expectH1(page, title) {
  const h1 = (await page.locator("h1").first().innerText()).trim();
  if (h1 !== title) throw new Error(`${page.url()}: expected the title "${title}", found "${h1}"`);
}

async function expectText(locator, wanted, what) {
  const text = (await locator.innerText()).replace(/\s+/g, " ").trim();
  const ok = wanted instanceof RegExp ? wanted.test(text) : text.includes(wanted);
  if (!ok) throw new Error(`${what}: expected ${wanted}, found "${text}"`);
  return text;
}

async function expectNotice(page, text) {
  const notices = await page.getByRole("status").allInnerTexts();
  if (!notices.some((n) => n.includes(text))) {
    throw new Error(`${page.url()}: expected the notice "${text}", found ${JSON.stringify(notices)}`);
  }
}

const button = (page, name) => page.getByRole("button", { name, exact: true });
const link = (page, name) => page.getByRole("link", { name, exact: true });
const codeInput = (page) => page.getByLabel("Code from your authenticator app", { exact: true });

// The text of the table row whose first cell is `label` (e.g. the approval's "Status").
const rowText = (page, label) =>
  page.evaluate((label) => {
    const row = [...document.querySelectorAll("tr")].find((tr) => tr.cells[0]?.textContent.trim() === label);
    return row ? row.textContent.replace(/\s+/g, " ").trim() : null;
  }, label);

async function agent(scope) {
  const answer = await ask({ need: "agent", scope });
  log(`  the agent asked for ${scope}: ${JSON.stringify({ ...answer, token: answer.token && "…" })}`);
  return answer;
}

async function signInWithPassword(page) {
  await page.getByLabel("Username", { exact: true }).fill(env("LK_USERNAME"));
  await page.getByLabel("Password", { exact: true }).fill(env("LK_PASSWORD"));
  await button(page, "Sign in").click();
}

// --- the story --------------------------------------------------------------------------------

async function story(page) {
  log("sign in with the password");
  await page.goto(at("/ui"));
  const login = expectPath(page, "/login");
  if (login.searchParams.get("next") !== "/ui") {
    deviations.push(`signed out, /ui sends to ${login.pathname}${login.search}, not /login?next=/ui`);
  }
  await shot(page, "login");
  await signInWithPassword(page);
  await arrive(page, "/ui");
  await expectH1(page, "Overview");
  for (const h2 of ["Connected accounts", "Waiting for your approval", "Tokens released per day", "Recent activity"]) {
    if (!(await page.getByRole("heading", { level: 2, name: h2, exact: true }).count())) {
      throw new Error(`the overview has no section "${h2}"`);
    }
  }
  if (!(await page.locator("svg#release-chart, #release-chart svg").count())) {
    throw new Error("the overview has no release chart");
  }
  await shot(page, "overview");

  log("turn on two-step verification");
  await visit(page, "/ui/security");
  await expectH1(page, "Security");
  await shot(page, "security");
  await button(page, "Set up two-step verification").click();
  await page.locator("#totp-secret").waitFor();
  if (!(await page.locator("#totp-qr svg").count())) throw new Error("no QR code (#totp-qr svg) on the set-up page");
  const secret = (await page.locator("#totp-secret").innerText()).trim();
  if (!/^[A-Z2-7]+=*$/.test(secret)) throw new Error(`#totp-secret is not base32: "${secret}"`);
  await shot(page, "security-totp-setup");
  const { code: enrolCode } = await ask({ need: "totp", secret });
  await codeInput(page).fill(enrolCode);
  await button(page, "Turn on").click();
  await arrive(page, "/ui/security");
  await expectNotice(page, "Two-step verification is on.");
  neverShown.set("the TOTP secret", secret);
  await shot(page, "security-totp-on");

  log("sign out");
  await button(page, "Sign out").first().click();
  await page.waitForURL((u) => u.origin === origin && u.pathname !== "/ui/security");
  await page.waitForLoadState("load");
  await shot(page, "signed-out");

  log("signed out, a link to a page asks for the password and a code, then shows that page");
  await page.goto(at("/ui/accounts"));
  const again = expectPath(page, "/login");
  if (again.searchParams.get("next") !== "/ui/accounts") {
    deviations.push(`signed out, /ui/accounts sends to ${again.pathname}${again.search}, not /login?next=/ui/accounts`);
  }
  await signInWithPassword(page);
  await arrive(page, "/login/totp");
  await shot(page, "login-totp");
  const { code: signInCode } = await ask({ need: "totp", secret });
  await codeInput(page).fill(signInCode);
  await button(page, "Verify").click();
  await page.waitForURL((u) => u.pathname !== "/login/totp", { waitUntil: "load" });
  if (new URL(page.url()).pathname !== "/ui/accounts") {
    deviations.push(`after signing in from /ui/accounts, the browser landed on ${page.url()} (titled "${await page.title()}")`);
    await shot(page, "signed-in-landing");
    await visit(page, "/ui/accounts");
  }

  log("connect demo-git through the provider's consent page");
  expectPath(page, "/ui/accounts");
  await expectH1(page, "Connected accounts");
  if (await page.locator("tr[data-account]").count()) throw new Error("a fresh user already has connected accounts");
  await shot(page, "accounts-empty");
  await link(page, "Connect demo-git").click();
  await arrive(page, "/demo/oauth/authorize");
  await expectText(page.locator("h1"), /^Authorize /, "the provider's consent page");
  await shot(page, "provider-consent");
  await button(page, "Approve").click();
  await arrive(page, "/ui/accounts");
  const connected = new URL(page.url());
  if (connected.searchParams.get("connected") !== "demo-git") throw new Error(`back from the provider at ${page.url()}`);
  await expectNotice(page, "Connected demo-git.");
  const rows = page.locator("tr[data-account]");
  if ((await rows.count()) !== 1) throw new Error(`expected one account row, found ${await rows.count()}`);
  const accountId = await rows.first().getAttribute("data-account");
  if (!accountId?.startsWith("cac_")) throw new Error(`the row's data-account is "${accountId}"`);
  await expectText(rows.first().locator(".health"), /^healthy$/, "the new account's health");
  await shot(page, "accounts-connected");

  log("the agent asks for a critical scope, longer after sign-in than the step-up window");
  await ask({ need: "step_up_window" });
  const held = await agent("repo:read");
  if (held.status !== 403 || held.error !== "authorization_pending" || !held.approval_id) {
    throw new Error(`the critical request should wait for approval: ${JSON.stringify(held)}`);
  }
  const approvalId = held.approval_id;

  log("approve it with step-up");
  await visit(page, "/ui/approvals");
  await expectH1(page, "Approvals");
  const pending = page.locator("li", { has: page.locator(`a[href$="/ui/approvals/${approvalId}"]`) });
  if ((await pending.count()) !== 1) throw new Error(`${approvalId} is not listed as waiting on /ui/approvals`);
  await shot(page, "approvals-waiting");
  await pending.getByRole("link", { name: "Review", exact: true }).click();
  await arrive(page, `/ui/approvals/${approvalId}`);
  await expectH1(page, "Approval request");
  const table = await page.locator("table").first().innerText();
  for (const shown of ["demo-git", "repo:read", "critical"]) {
    if (!table.includes(shown)) throw new Error(`the approval page does not show "${shown}": ${table}`);
  }
  if (!(await codeInput(page).count())) throw new Error("past the step-up window, the approval page should ask for a code");
  await shot(page, "approval-review");
  const { code: stepUpCode } = await ask({ need: "totp", secret });
  await codeInput(page).fill(stepUpCode);
  await button(page, "Approve").click();
  await arrive(page, `/ui/approvals/${approvalId}`);
  const status = await rowText(page, "Status");
  if (!status || !/approved by/.test(status) || !status.includes("(with step-up)")) {
    throw new Error(`after approving, the Status row reads "${status}"`);
  }
  if (await button(page, "Approve").count()) throw new Error("a decided request still offers Approve");
  await shot(page, "approval-approved");

  log("the agent asks again and gets its token");
  const released = await agent("repo:read");
  if (released.status !== 200 || released.token_ok !== true || !released.token) {
    throw new Error(`after approval: ${JSON.stringify({ ...released, token: released.token && "…" })}`);
  }
  neverShown.set("the released access token", released.token);

  log("the release is on the activity page");
  await visit(page, "/ui/activity");
  await expectH1(page, "Activity");
  const releaseRows = page.locator("table#audit tr", { hasText: "token.release" });
  if (!(await releaseRows.count())) throw new Error("no token.release row in table#audit");
  await expectText(page.locator("#chain-status"), /\S/, "the chain status");
  await shot(page, "activity");
  const action = page.getByLabel("Action", { exact: true });
  if ((await action.evaluate((el) => el.tagName)) === "SELECT") await action.selectOption("token.release");
  else await action.fill("token.release");
  await button(page, "Filter").click();
  // A plain GET, or htmx swapping the results in and pushing the URL: either way the URL says.
  await page.waitForURL((u) => u.pathname === "/ui/activity" && u.searchParams.get("action") === "token.release");
  const onlyReleases = async () => {
    const rows = await page.locator("table#audit tbody tr").allInnerTexts();
    return rows.length > 0 && rows.every((r) => r.includes("token.release")) ? rows : null;
  };
  let filtered = await onlyReleases();
  for (let i = 0; !filtered && i < 20; i += 1) {
    await page.waitForTimeout(250);
    filtered = await onlyReleases();
  }
  if (!filtered) {
    const rows = await page.locator("table#audit tbody tr").allInnerTexts();
    throw new Error(`filtered by token.release, the table shows: ${JSON.stringify(rows)}`);
  }
  await shot(page, "activity-filtered");

  log("disconnect demo-git");
  await visit(page, "/ui/accounts");
  await page.locator(`tr[data-account="${accountId}"]`).getByRole("link", { name: "Disconnect", exact: true }).click();
  await arrive(page, `/ui/accounts/${accountId}/disconnect`);
  await expectH1(page, "Disconnect demo-git?");
  await shot(page, "disconnect-confirm");
  await button(page, "Disconnect").click();
  await arrive(page, "/ui/accounts");
  await expectNotice(page, "Disconnected demo-git.");
  const gone = page.locator(`tr[data-account="${accountId}"]`);
  if (await gone.count()) {
    await expectText(gone.locator(".health"), /^revoked$/, "the disconnected account's health");
    if (await gone.getByRole("link", { name: "Disconnect", exact: true }).count()) {
      throw new Error("a revoked account still offers Disconnect");
    }
  }
  await shot(page, "accounts-disconnected");

  log("the agent's next exchange fails");
  const refused = await agent("repo:read");
  if (refused.status !== 401 || refused.error !== "federated_connection_refresh_token_not_found") {
    throw new Error(`after disconnecting: ${JSON.stringify(refused)}`);
  }

  await visit(page, "/ui");
  await expectH1(page, "Overview");
  await shot(page, "overview-end");

  log("the operator's pages (the demo user is an operator): agents, the demo agent, users");
  await visit(page, "/ui/agents");
  await expectH1(page, "Agents");
  await shot(page, "agents");
  await link(page, "demo-agent").click();
  await page.waitForLoadState("load");
  await expectH1(page, "Agent demo-agent");
  await expectText(page.locator("main"), "repo:read=critical", "the demo agent's grant");
  await expectText(page.locator("main"), "token.release", "the demo agent's activity");
  await shot(page, "agent");
  await visit(page, "/ui/users");
  await expectH1(page, "Users");
  await expectText(page.locator("main"), "demo (you)", "the users list");
  await shot(page, "users");
  log(`Content-Security-Policy seen: ${[...policies].join(" | ")}`);
}

// --- run --------------------------------------------------------------------------------------

let browser;
try {
  browser = await chromium.launch({
    executablePath: process.env.LK_CHROMIUM || "/usr/bin/chromium",
    timeout: 30_000,
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
  });
  log(`Chromium ${browser.version()}`);
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 800 } });
  context.setDefaultTimeout(10_000);
  context.setDefaultNavigationTimeout(15_000);
  watch(context);
  // Refuse (after recording, above) anything bound for another origin.
  await context.route(
    (url) => (url.protocol === "http:" || url.protocol === "https:") && url.origin !== origin,
    (route) => route.abort("blockedbyclient"),
  );
  // Violations the page itself sees; the binding is CDP's, so the page's CSP cannot stop it.
  await context.exposeBinding("__latchkeyCspViolation", (_source, v) => {
    problems.push(`CSP violation: ${v.directive} blocked ${v.blocked || "(inline)"} on ${v.document}`);
  });
  await context.addInitScript(() => {
    document.addEventListener(
      "securitypolicyviolation",
      (e) =>
        window.__latchkeyCspViolation({ directive: e.effectiveDirective, blocked: e.blockedURI, document: e.documentURI }),
      true,
    );
  });
  const page = await context.newPage();
  currentPage = page;
  watchPage(page);
  context.on("page", (p) => {
    if (p !== page) problems.push(`a second page was opened: ${p.url()}`);
  });

  await story(page);
  await assertClean("at the end");
  if (deviations.length) throw new Error(`the pages deviate from the contract:\n  ${deviations.join("\n  ")}`);
  process.stdout.write(`${JSON.stringify({ done: true })}\n`);
  log(`done: ${shotNumber} screenshots in ${shotsDir}`);
  await browser.close();
  process.exit(0);
} catch (e) {
  log(`FAILED: ${e.stack || e}`);
  if (currentPage) {
    try {
      const file = join(shotsDir, `${String(shotNumber + 1).padStart(2, "0")}-FAILED.png`);
      await currentPage.screenshot({ path: file, fullPage: true, timeout: 5_000 });
      log(`  where it failed: ${currentPage.url()} -> ${file}`);
    } catch {
      // the page is gone: the message above says enough
    }
  }
  await Promise.race([browser?.close(), new Promise((r) => setTimeout(r, 5_000))]);
  process.exit(1);
}

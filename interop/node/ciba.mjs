// `@auth0/ai-vercel` Auth0AI.withAsyncAuthorization() (the `@auth0/ai` CIBA authorizer), unchanged,
// against Latchkey over TLS (trust: NODE_EXTRA_CA_CERTS). One process keeps the SDK's in-memory
// store across steps, as an agent between two turns of a conversation does, while the test on
// the other end of stdin/stdout approves, denies and moves the server's clock.
//
//   node ciba.mjs
//
// Inputs (environment): LK_DOMAIN (host:port, as the SDKs take it), LK_CLIENT_ID,
// LK_CLIENT_SECRET, LK_USER_ID.
//
// Two tools, each wrapping a Vercel AI SDK `tool()` (`ai` 5) whose execute returns
// getAsyncAuthorizationCredentials(); execute is invoked as the AI SDK invokes it (input,
// {toolCallId, messages}) inside runWithAIContext, no model involved:
//   buy        onAuthorizationRequest "interrupt" (the default): each call starts or polls once;
//   buy-block  onAuthorizationRequest "block": the call polls until the user decides.
// Both ask for scope `stock:trade` (the SDK adds openid) with a binding message naming the
// quantity and RFC 9396 authorization_details, and no audience (the SDK sends `audience=`).
//
// And an exchange Latchkey held for the user's approval: its 403 body carries what a
// /bc-authorize answer does (`auth_req_id`, `expires_in`, `interval`), so the SDK's own CIBA
// poller (`AsyncAuthorizerBase.getCredentials`) resumes it as it would its own request.
//
// Protocol: one JSON command per line on stdin, one JSON answer per line on stdout:
//   {"tool": "buy", "call": "<toolCallId>", "qty": 3}
//   {"resume": <the held exchange's JSON error body>}
//   -> {"ok": true, "credentials": {...}}            the tool ran with (or the poll gave) these
//   -> {"ok": false, "interrupt": {name, code, message}, "retry": <seconds>}
// The process ends when stdin closes.

import { createInterface } from "node:readline";
import { createRequire } from "node:module";

import { env } from "./common.mjs";

// CommonJS builds: @auth0/ai-vercel's ESM build has extension-less relative imports.
const require = createRequire(import.meta.url);
const { Auth0AI, getAsyncAuthorizationCredentials, runWithAIContext } = require("@auth0/ai-vercel");
const { Auth0Interrupt } = require("@auth0/ai/interrupts");
const { AsyncAuthorizerBase } = require("@auth0/ai/AsyncAuthorization");
const { MemoryStore } = require("@auth0/ai/stores");
const { tool } = require("ai");
const { z } = require("zod");

const auth0AI = new Auth0AI({
  auth0: { domain: env("LK_DOMAIN"), clientId: env("LK_CLIENT_ID"), clientSecret: env("LK_CLIENT_SECRET") },
});

const protect = (onAuthorizationRequest) =>
  auth0AI.withAsyncAuthorization({
    userID: env("LK_USER_ID"),
    bindingMessage: async ({ qty }) => `Buy ${qty} shares of ACME`,
    scopes: ["stock:trade"],
    requestedExpiry: 300,
    authorizationDetails: async ({ qty }) => [{ type: "trade", ticker: "ACME", qty }],
    onAuthorizationRequest,
  });

const trade = (description) =>
  tool({
    description,
    inputSchema: z.object({ qty: z.number() }),
    execute: async () => {
      const c = getAsyncAuthorizationCredentials();
      return {
        accessToken: c.accessToken,
        idToken: c.idToken,
        tokenType: c.tokenType,
        expiresIn: c.expiresIn,
        scopes: c.scopes,
        authorizationDetails: c.authorizationDetails,
      };
    },
  });

const tools = {
  buy: protect("interrupt")(trade("Buy shares (asks the user first)")),
  "buy-block": protect("block")(trade("Buy shares, waiting for the user")),
};

const interrupt = (e) => ({
  ok: false,
  interrupt: { name: e.name, code: e.code, message: e.message },
  retry: typeof e.nextRetryInterval === "function" ? e.nextRetryInterval() : undefined,
});

const poller = new AsyncAuthorizerBase(
  { domain: env("LK_DOMAIN"), clientId: env("LK_CLIENT_ID"), clientSecret: env("LK_CLIENT_SECRET") },
  { store: new MemoryStore(), userID: env("LK_USER_ID"), scopes: [] },
);
const requestedAt = new Map();

async function resume(held) {
  if (!requestedAt.has(held.auth_req_id)) requestedAt.set(held.auth_req_id, Date.now() / 1000);
  const request = {
    id: held.auth_req_id,
    requestedAt: requestedAt.get(held.auth_req_id),
    expiresIn: held.expires_in,
    interval: held.interval,
  };
  try {
    const c = await poller.getCredentials(request);
    return { ok: true, credentials: { accessToken: c.accessToken, tokenType: c.tokenType, expiresIn: c.expiresIn, scopes: c.scopes } };
  } catch (e) {
    if (e instanceof Auth0Interrupt) return interrupt(e);
    return { ok: false, error: String(e?.stack ?? e) };
  }
}

async function run(command) {
  if (command.resume) return resume(command.resume);
  const t = tools[command.tool];
  if (!t) throw new Error(`unknown tool ${command.tool}`);
  const options = { toolCallId: command.call, messages: [] };
  try {
    const result = await runWithAIContext({ threadID: "thread-1" }, () => t.execute({ qty: command.qty }, options));
    // Refusals other than "pending" come back as the tool's result (the SDK's onUnauthorized
    // default), interrupts in all but name.
    if (result instanceof Auth0Interrupt) return interrupt(result);
    return { ok: true, credentials: result };
  } catch (e) {
    if (e instanceof Auth0Interrupt) return interrupt(e);
    return { ok: false, error: String(e?.stack ?? e) };
  }
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  console.log(JSON.stringify(await run(JSON.parse(line))));
}

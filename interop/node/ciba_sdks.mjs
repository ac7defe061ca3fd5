// CIBA through more of Auth0's Node SDKs, unchanged, against Latchkey over TLS (trust:
// NODE_EXTRA_CA_CERTS) — auth0-wire.md T37, T42, T43.
//
//   node ciba_sdks.mjs <scenario>
//
// Scenarios (inputs by environment; LK_DOMAIN is host:port, as the SDKs take it; every one takes
// LK_CLIENT_ID, LK_CLIENT_SECRET, LK_USER_ID):
//   n4-authorize   `auth0` 7 (`auth0/legacy` AuthenticationClient).backchannel.authorize({userId,
//       binding_message, scope: "openid", audience: "", requested_expiry: "300"}):
//       LK_BINDING_MESSAGE.
//   n4-grant       ….backchannel.backchannelGrant({auth_req_id}): LK_AUTH_REQ_ID.
//   auth-js-backchannel   `@auth0/auth0-auth-js` AuthClient.backchannelAuthentication({
//       bindingMessage, loginHint: {sub}}): starts, then polls (openid-client, honouring
//       `interval`) until the user decides; also reports the discovery document's issuer.
//       LK_BINDING_MESSAGE.
//   ai-start       `@auth0/ai-vercel` Auth0AI.withAsyncAuthorization() (interrupt mode) around a
//       Vercel AI SDK `tool()`, executed once as the AI SDK executes it: what came of it.
//
// Prints one JSON object: {"ok": true, ...} with what the SDK returned, or {"ok": false, ...}
// with what it threw. "sent" lists the SDK's requests to Latchkey as observed by a passive spy on
// fetch (path, content type, auth scheme, parameters — secrets never printed — and the answer's
// status and, for errors, its `error`).

import { createRequire } from "node:module";

import { env, spyOnFetch } from "./common.mjs";

const sent = spyOnFetch({ secrets: ["client_secret", "client_assertion"], answers: true });

const require = createRequire(import.meta.url);

const apiError = (e) => ({
  ok: false,
  name: e?.name,
  statusCode: e?.statusCode,
  error: e?.error ?? e?.code,
  error_description: e?.error_description ?? e?.message,
  cause: e?.cause ? { name: e.cause.name, code: e.cause.code, error: e.cause.error, message: e.cause.message } : undefined,
});

const legacy = async () => {
  const { AuthenticationClient } = await import("auth0/legacy");
  return new AuthenticationClient({
    domain: env("LK_DOMAIN"),
    clientId: env("LK_CLIENT_ID"),
    clientSecret: env("LK_CLIENT_SECRET"),
  });
};

const scenarios = {
  async "n4-authorize"() {
    const auth = await legacy();
    try {
      const data = await auth.backchannel.authorize({
        userId: env("LK_USER_ID"),
        binding_message: env("LK_BINDING_MESSAGE"),
        scope: "openid",
        audience: "",
        requested_expiry: "300",
      });
      return { ok: true, data };
    } catch (e) {
      return apiError(e);
    }
  },

  async "n4-grant"() {
    const auth = await legacy();
    try {
      const data = await auth.backchannel.backchannelGrant({ auth_req_id: env("LK_AUTH_REQ_ID") });
      return { ok: true, data };
    } catch (e) {
      return apiError(e);
    }
  },

  async "auth-js-backchannel"() {
    const { AuthClient } = await import("@auth0/auth0-auth-js");
    const client = new AuthClient({
      domain: env("LK_DOMAIN"),
      clientId: env("LK_CLIENT_ID"),
      clientSecret: env("LK_CLIENT_SECRET"),
    });
    const issuer = (await client.getServerMetadata()).issuer;
    const started = Date.now();
    try {
      const t = await client.backchannelAuthentication({
        bindingMessage: env("LK_BINDING_MESSAGE"),
        loginHint: { sub: env("LK_USER_ID") },
      });
      return {
        ok: true,
        issuer,
        seconds: (Date.now() - started) / 1000,
        token: {
          accessToken: t.accessToken,
          idToken: t.idToken,
          refreshToken: t.refreshToken,
          expiresAt: t.expiresAt,
          scope: t.scope,
          claims: t.claims,
        },
      };
    } catch (e) {
      return { ...apiError(e), issuer };
    }
  },

  async "ai-start"() {
    // CommonJS builds: @auth0/ai-vercel's ESM build has extension-less relative imports.
    const { Auth0AI, getAsyncAuthorizationCredentials, runWithAIContext } = require("@auth0/ai-vercel");
    const { Auth0Interrupt } = require("@auth0/ai/interrupts");
    const { tool } = require("ai");
    const { z } = require("zod");
    const auth0AI = new Auth0AI({
      auth0: { domain: env("LK_DOMAIN"), clientId: env("LK_CLIENT_ID"), clientSecret: env("LK_CLIENT_SECRET") },
    });
    const buy = auth0AI.withAsyncAuthorization({
      userID: env("LK_USER_ID"),
      bindingMessage: async ({ qty }) => `Buy ${qty} shares of ACME`,
      scopes: ["stock:trade"],
    })(
      tool({
        description: "Buy shares (asks the user first)",
        inputSchema: z.object({ qty: z.number() }),
        execute: async () => ({ accessToken: getAsyncAuthorizationCredentials().accessToken }),
      }),
    );
    const interrupt = (e) => ({
      ok: false,
      interrupt: { class: e.constructor?.name, name: e.name, code: e.code, message: e.message },
    });
    try {
      const result = await runWithAIContext({ threadID: "thread-1" }, () =>
        buy.execute({ qty: 1 }, { toolCallId: "call-1", messages: [] }),
      );
      if (result instanceof Auth0Interrupt) return interrupt(result);
      return { ok: true, credentials: result };
    } catch (e) {
      if (e instanceof Auth0Interrupt) return interrupt(e);
      return { ok: false, error: String(e?.stack ?? e) };
    }
  },
};

const scenario = scenarios[process.argv[2]];
if (!scenario) {
  console.error(`unknown scenario ${process.argv[2]}; one of ${Object.keys(scenarios).join(", ")}`);
  process.exit(2);
}
console.log(JSON.stringify({ ...(await scenario()), sent }));

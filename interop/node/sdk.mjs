// Auth0's Node SDKs, unchanged, against Latchkey over TLS (trust: NODE_EXTRA_CA_CERTS).
//
//   node sdk.mjs <scenario>
//
// Scenarios (inputs by environment; LK_DOMAIN is host:port, as the SDKs take it):
//   auth0-token-for-connection   `auth0` 7 (`auth0/legacy` AuthenticationClient)
//       .oauth.tokenForConnection: LK_CLIENT_ID, LK_CLIENT_SECRET, LK_SUBJECT_TOKEN,
//       LK_CONNECTION, optional LK_SUBJECT_TOKEN_TYPE, LK_LOGIN_HINT.
//   auth-js-discovery            `@auth0/auth0-auth-js` AuthClient.getServerMetadata():
//       LK_CLIENT_ID, LK_CLIENT_SECRET.
//   auth-js-exchange             AuthClient.exchangeToken({connection, subjectToken,
//       subjectTokenType}): LK_CLIENT_ID, LK_CLIENT_SECRET or LK_KEY_FILE (PKCS#8 PEM, for
//       private_key_jwt), LK_SUBJECT_TOKEN, LK_SUBJECT_TOKEN_TYPE, LK_CONNECTION.
//   ai-token-vault               `@auth0/ai` TokenVaultAuthorizerBase.protect() around a tool that
//       calls getAccessTokenFromTokenVault() — the code every framework's withTokenVault() wraps:
//       LK_CLIENT_ID, LK_CLIENT_SECRET, LK_REFRESH_TOKEN, LK_CONNECTION, LK_SCOPES (spaces).
//   ai-vercel-with-token-vault   `@auth0/ai-vercel` Auth0AI.withTokenVault() wrapping a Vercel AI
//       SDK `tool()` (`ai` 5) whose execute calls getAccessTokenFromTokenVault(); execute is
//       invoked as the AI SDK invokes it (input, {toolCallId, messages}), no model involved.
//       Same inputs and answer as ai-token-vault.
//
// Prints one JSON object: {"ok": true, ...} with what the SDK returned, or {"ok": false, ...}
// with what it threw. "sent" lists the SDK's requests to Latchkey as observed by a spy on
// fetch (URL path, content type, parameter names; secrets never printed).

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

import { env, spyOnFetch } from "./common.mjs";
const optional = (name) => process.env[name] || undefined;

// A passive spy on fetch: it records what the SDKs send and forwards every call untouched.
const sent = spyOnFetch({ secrets: ["client_secret", "client_assertion", "subject_token"] });

const print = (result) => console.log(JSON.stringify({ ...result, sent }));

const scenarios = {
  async "auth0-token-for-connection"() {
    const { AuthenticationClient } = await import("auth0/legacy");
    const auth = new AuthenticationClient({
      domain: env("LK_DOMAIN"),
      clientId: env("LK_CLIENT_ID"),
      clientSecret: env("LK_CLIENT_SECRET"),
    });
    const params = { subject_token: env("LK_SUBJECT_TOKEN"), connection: env("LK_CONNECTION") };
    if (optional("LK_SUBJECT_TOKEN_TYPE")) params.subject_token_type = env("LK_SUBJECT_TOKEN_TYPE");
    if (optional("LK_LOGIN_HINT")) params.login_hint = env("LK_LOGIN_HINT");
    try {
      const res = await auth.oauth.tokenForConnection(params);
      return { ok: true, status: res.status, data: res.data };
    } catch (e) {
      return {
        ok: false,
        name: e.name,
        statusCode: e.statusCode,
        error: e.error,
        error_description: e.error_description,
      };
    }
  },

  async "auth-js-discovery"() {
    const { AuthClient } = await import("@auth0/auth0-auth-js");
    const client = new AuthClient({
      domain: env("LK_DOMAIN"),
      clientId: env("LK_CLIENT_ID"),
      clientSecret: env("LK_CLIENT_SECRET"),
    });
    const m = await client.getServerMetadata();
    return {
      ok: true,
      metadata: {
        issuer: m.issuer,
        token_endpoint: m.token_endpoint,
        authorization_endpoint: m.authorization_endpoint,
        jwks_uri: m.jwks_uri,
      },
    };
  },

  async "auth-js-exchange"() {
    const { AuthClient } = await import("@auth0/auth0-auth-js");
    const keyFile = optional("LK_KEY_FILE");
    const client = new AuthClient({
      domain: env("LK_DOMAIN"),
      clientId: env("LK_CLIENT_ID"),
      ...(keyFile
        ? { clientAssertionSigningKey: readFileSync(keyFile, "utf8"), clientAssertionSigningAlg: "RS256" }
        : { clientSecret: env("LK_CLIENT_SECRET") }),
    });
    try {
      const t = await client.exchangeToken({
        connection: env("LK_CONNECTION"),
        subjectToken: env("LK_SUBJECT_TOKEN"),
        subjectTokenType: env("LK_SUBJECT_TOKEN_TYPE"),
      });
      return {
        ok: true,
        token: {
          accessToken: t.accessToken,
          expiresAt: t.expiresAt,
          scope: t.scope,
          tokenType: t.tokenType,
          issuedTokenType: t.issuedTokenType,
        },
        now: Math.floor(Date.now() / 1000),
      };
    } catch (e) {
      return {
        ok: false,
        name: e.name,
        code: e.code,
        message: e.message,
        statusCode: e.statusCode,
        cause: e.cause && {
          error: e.cause.error,
          error_description: e.cause.error_description,
          statusCode: e.cause.statusCode,
        },
      };
    }
  },

  async "ai-token-vault"() {
    // @auth0/ai's ESM build uses extension-less relative imports that Node's ESM loader does
    // not resolve (bundlers do); its CommonJS build is what a plain Node script can load.
    const require = createRequire(import.meta.url);
    const { TokenVaultAuthorizerBase, getAccessTokenFromTokenVault, getCredentialsFromTokenVault } =
      require("@auth0/ai/TokenVault");
    const { TokenVaultInterrupt } = require("@auth0/ai/interrupts");
    const { MemoryStore } = require("@auth0/ai/stores");
    const authorizer = new TokenVaultAuthorizerBase(
      { domain: env("LK_DOMAIN"), clientId: env("LK_CLIENT_ID"), clientSecret: env("LK_CLIENT_SECRET") },
      {
        connection: env("LK_CONNECTION"),
        scopes: env("LK_SCOPES").split(" "),
        refreshToken: async () => env("LK_REFRESH_TOKEN"),
        store: new MemoryStore(),
      },
    );
    // A tool as an agent framework would run it; the context names the thread and the call.
    const tool = authorizer.protect(
      () => ({ threadID: "thread-1", toolName: "read-profile", toolCallID: "call-1" }),
      async () => ({ accessToken: getAccessTokenFromTokenVault(), credentials: getCredentialsFromTokenVault() }),
    );
    try {
      const { accessToken, credentials } = await tool();
      return {
        ok: true,
        accessToken,
        credentials: { tokenType: credentials.tokenType, expiresIn: credentials.expiresIn, scopes: credentials.scopes },
      };
    } catch (e) {
      if (!(e instanceof TokenVaultInterrupt)) throw e;
      // The interrupt as the SDK serializes it for the front end (AUTH0_AI_INTERRUPT JSON).
      return { ok: false, interrupt: e.toJSON() };
    }
  },

  async "ai-vercel-with-token-vault"() {
    // CommonJS builds, as for ai-token-vault: @auth0/ai-vercel's ESM build has extension-less
    // relative imports too.
    const require = createRequire(import.meta.url);
    const { Auth0AI, getAccessTokenFromTokenVault, getCredentialsFromTokenVault, runWithAIContext } =
      require("@auth0/ai-vercel");
    const { TokenVaultInterrupt } = require("@auth0/ai/interrupts");
    const { tool } = require("ai");
    const { z } = require("zod");
    const auth0AI = new Auth0AI({
      auth0: { domain: env("LK_DOMAIN"), clientId: env("LK_CLIENT_ID"), clientSecret: env("LK_CLIENT_SECRET") },
    });
    const withConnection = auth0AI.withTokenVault({
      connection: env("LK_CONNECTION"),
      scopes: env("LK_SCOPES").split(" "),
      refreshToken: async () => env("LK_REFRESH_TOKEN"),
    });
    const readProfile = withConnection(
      tool({
        description: "Read the user's profile at the upstream provider",
        inputSchema: z.object({ what: z.string() }),
        execute: async () => ({
          accessToken: getAccessTokenFromTokenVault(),
          credentials: getCredentialsFromTokenVault(),
        }),
      }),
    );
    // The route handler sets the thread (setAIContext / runWithAIContext); the AI SDK passes the
    // tool call's options as execute's second argument.
    const options = { toolCallId: "call-1", messages: [] };
    try {
      const { accessToken, credentials } = await runWithAIContext({ threadID: "thread-1" }, () =>
        readProfile.execute({ what: "user" }, options),
      );
      return {
        ok: true,
        accessToken,
        credentials: { tokenType: credentials.tokenType, expiresIn: credentials.expiresIn, scopes: credentials.scopes },
      };
    } catch (e) {
      if (!(e instanceof TokenVaultInterrupt)) throw e;
      return { ok: false, interrupt: e.toJSON() };
    }
  },
};

const scenario = scenarios[process.argv[2]];
if (!scenario) {
  console.error(`unknown scenario ${process.argv[2]}; one of: ${Object.keys(scenarios).join(", ")}`);
  process.exit(2);
}
print(await scenario());

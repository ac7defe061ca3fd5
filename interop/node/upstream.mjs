// A real third-party upstream for Latchkey's interop tests: `oidc-provider` (a certified OpenID
// provider, from npm, configured here but otherwise unchanged) on 127.0.0.1, plain HTTP, port 0.
//
// Two accounts, chosen on the login page: alice (sub acc-alice) and bob (sub acc-bob), each
// with a password. One registered client, `latchkey` (client_secret_basic), allowed the
// authorization_code and refresh_token grants, PKCE required. `offline_access` follows the
// certified default: honoured only with `prompt=consent` (OpenID Connect Core §11). Access
// tokens live 60 s, refresh tokens rotate on every use; RFC 7009 revocation is on.
//
// Inputs (environment): UP_CLIENT_SECRET, UP_REDIRECT_URI (Latchkey's /connect/{connection}/callback).
// Output: the issuer URL on the first stdout line; then one JSON line per provider event
// ({"event", "kind", "id", "sub", "grant"}; `id` is a digest of the token, never the token).
// It exits when its standard input closes, so it never outlives the test that started it.

import { createHash, generateKeyPairSync, randomBytes } from "node:crypto";
import { createServer } from "node:http";

import Provider from "oidc-provider";

import { env } from "./common.mjs";

const ACCOUNTS = {
  alice: { sub: "acc-alice", password: "alice-password", name: "Alice Liddell" },
  bob: { sub: "acc-bob", password: "bob-password", name: "Bob Builder" },
};
const bySub = Object.fromEntries(
  Object.entries(ACCOUNTS).map(([login, a]) => [a.sub, { login, ...a }]),
);

const server = createServer();
await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
const issuer = `http://127.0.0.1:${server.address().port}`;

const { privateKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
const provider = new Provider(issuer, {
  clients: [
    {
      client_id: "latchkey",
      client_secret: env("UP_CLIENT_SECRET"),
      redirect_uris: [env("UP_REDIRECT_URI")],
      grant_types: ["authorization_code", "refresh_token"],
      response_types: ["code"],
      token_endpoint_auth_method: "client_secret_basic",
    },
  ],
  async findAccount(_ctx, sub) {
    const account = bySub[sub];
    if (!account) return undefined;
    return {
      accountId: sub,
      async claims() {
        return { sub, name: account.name, preferred_username: account.login };
      },
    };
  },
  claims: { openid: ["sub"], profile: ["name", "preferred_username"] },
  scopes: ["openid", "offline_access", "profile"],
  features: {
    devInteractions: { enabled: false },
    revocation: { enabled: true },
    userinfo: { enabled: true },
  },
  pkce: { required: () => true },
  ttl: {
    AccessToken: 60,
    AuthorizationCode: 60,
    IdToken: 60,
    Interaction: 600,
    Session: 3600,
    Grant: 3600,
    RefreshToken: 3600,
  },
  rotateRefreshToken: true,
  cookies: { keys: [randomBytes(32).toString("base64url")] },
  jwks: { keys: [{ ...privateKey.export({ format: "jwk" }), kid: "up-1", use: "sig", alg: "RS256" }] },
  interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
});

// Provider events, for the test to observe rotation and revocation from the provider's side.
const digest = (value) => createHash("sha256").update(String(value)).digest("base64url").slice(0, 12);
const report = (event) => (token) =>
  console.log(
    JSON.stringify({
      event,
      kind: token.kind,
      id: digest(token.jti),
      sub: token.accountId ?? null,
      grant: token.grantId ? digest(token.grantId) : null,
    }),
  );
for (const event of [
  "access_token.saved",
  "access_token.destroyed",
  "refresh_token.saved",
  "refresh_token.consumed",
  "refresh_token.destroyed",
]) {
  provider.on(event, report(event));
}
provider.on("grant.revoked", (_ctx, grantId) =>
  console.log(JSON.stringify({ event: "grant.revoked", grant: digest(grantId) })),
);
// Errors the provider answers with stay visible (stderr) without failing anything here.
for (const event of ["server_error", "grant.error", "revocation.error", "userinfo.error"]) {
  provider.on(event, (_ctx, err) => console.error(`${event}: ${err?.message} ${err?.error_description ?? ""}`));
}

// --- the interaction pages: login (pick an account), then consent --------------------------

const escape = (s) =>
  String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

function page(res, status, title, body) {
  const html = `<!DOCTYPE html><html><head><meta charset="utf-8"><title>${escape(title)}</title></head><body><h1>${escape(title)}</h1>${body}</body></html>`;
  res.writeHead(status, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" });
  res.end(html);
}

async function formBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 16 * 1024) throw new Error("form too large");
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString("utf8"));
}

function loginPage(res, uid, error) {
  const options = Object.keys(ACCOUNTS)
    .map((login) => `<option value="${login}">${escape(login)}</option>`)
    .join("");
  page(
    res,
    error ? 401 : 200,
    "Sign in to the upstream provider",
    `${error ? `<p class="error">${escape(error)}</p>` : ""}
<form method="post" action="/interaction/${escape(uid)}/login">
  <label>Account <select name="login">${options}</select></label>
  <label>Password <input type="password" name="password"></label>
  <button type="submit">Sign in</button>
</form>`,
  );
}

function consentPage(res, uid, details) {
  const scopes = details.params.scope ?? "";
  page(
    res,
    200,
    "Authorize latchkey",
    `<p>${escape(details.params.client_id)} asks for: <code>${escape(scopes)}</code></p>
<form method="post" action="/interaction/${escape(uid)}/confirm">
  <input type="hidden" name="decision" value="approve">
  <button type="submit">Allow</button>
</form>`,
  );
}

async function interaction(req, res) {
  const url = new URL(req.url, issuer);
  const [, , uid, action] = url.pathname.split("/");
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) return page(res, 400, "Wrong interaction", "");
  const { prompt } = details;
  if (req.method === "GET" && !action) {
    return prompt.name === "login" ? loginPage(res, uid) : consentPage(res, uid, details);
  }
  if (req.method === "POST" && action === "login" && prompt.name === "login") {
    const form = await formBody(req);
    const account = ACCOUNTS[form.get("login")];
    if (!account || form.get("password") !== account.password) {
      return loginPage(res, uid, "Wrong account or password.");
    }
    return provider.interactionFinished(req, res, { login: { accountId: account.sub } }, { mergeWithLastSubmission: false });
  }
  if (req.method === "POST" && action === "confirm" && prompt.name === "consent") {
    await formBody(req);
    const { accountId } = details.session;
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId, clientId: details.params.client_id });
    const missing = prompt.details;
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(" "));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(" "));
    }
    const grantId = await grant.save();
    return provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
  }
  return page(res, 400, "Unexpected step", `<p>${escape(prompt.name)}</p>`);
}

const callback = provider.callback();
server.on("request", (req, res) => {
  if (req.url.startsWith("/interaction/")) {
    interaction(req, res).catch((err) => {
      console.error(`interaction: ${err?.message}`);
      if (!res.headersSent) page(res, 400, "Interaction failed", `<p>${escape(err?.message)}</p>`);
    });
  } else {
    callback(req, res);
  }
});

console.log(issuer);
process.stdin.resume();
process.stdin.on("end", () => process.exit(0));
process.stdin.on("close", () => process.exit(0));

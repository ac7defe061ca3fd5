// A hand-written Node agent, as a developer would write one with no SDK: Node's own crypto
// signs an RS256 privileged-worker JWT (typ: token-vault-req+jwt), and fetch() posts a JSON
// body to /oauth/token with the agent's client id and secret. Trust for Latchkey's local CA
// comes from NODE_EXTRA_CA_CERTS.
//
// Inputs (environment): LK_ISSUER, LK_CLIENT_ID, LK_CLIENT_SECRET, LK_KEY_FILE (PKCS#8 PEM),
// LK_USER_ID, LK_CONNECTION. Prints {"status", "body"} as JSON.

import { createSign, randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";

import { env } from "./common.mjs";
const issuer = env("LK_ISSUER");
const b64url = (data) => Buffer.from(data).toString("base64url");

function signJwt(header, claims, pem) {
  const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
  const signature = createSign("RSA-SHA256").update(input).sign(pem);
  return `${input}.${b64url(signature)}`;
}

const now = Math.floor(Date.now() / 1000);
const subjectToken = signJwt(
  { alg: "RS256", typ: "token-vault-req+jwt" },
  {
    iss: env("LK_CLIENT_ID"),
    sub: env("LK_USER_ID"),
    aud: issuer,
    iat: now,
    exp: now + 60,
    jti: randomUUID(),
    audit_context: "hand-written node agent",
  },
  readFileSync(env("LK_KEY_FILE"), "utf8"),
);

const res = await fetch(new URL("oauth/token", issuer), {
  method: "POST",
  headers: { "content-type": "application/json" },
  body: JSON.stringify({
    grant_type: "urn:auth0:params:oauth:grant-type:token-exchange:federated-connection-access-token",
    client_id: env("LK_CLIENT_ID"),
    client_secret: env("LK_CLIENT_SECRET"),
    subject_token_type: "urn:ietf:params:oauth:token-type:jwt",
    subject_token: subjectToken,
    requested_token_type: "http://auth0.com/oauth/token-type/token-vault-access-token",
    connection: env("LK_CONNECTION"),
  }),
});
console.log(JSON.stringify({ status: res.status, contentType: res.headers.get("content-type"), body: await res.json() }));

// The peer of Latchkey's exchange benchmark: `oidc-provider` (npm, a certified OpenID
// provider, configured here but otherwise unchanged) answering `client_credentials` grants
// whose clients authenticate with `private_key_jwt` — a server doing the same kind of work as
// Latchkey's token endpoint (verify a signed client assertion, refuse a replayed `jti`, issue
// a token), measured by bench/exchange.py with the same wrk settings in the same run.
//
// HTTPS on 127.0.0.1, port 0, with the certificate and key Latchkey's own server uses in that
// run (TLS_CERT, TLS_KEY: PEM paths), so both sides pay for the same handshake and cipher.
// One Node process (Node runs JavaScript on one thread; the in-memory adapter, oidc-provider's
// default, cannot be shared between processes, so the replay check would not hold in a cluster).
//
// Inputs (environment): TLS_CERT, TLS_KEY; CLIENTS: a JSON file `[{"client_id", "jwks"}]`
// (public keys only). Output: the issuer URL on the first stdout line. It exits when its
// standard input closes, so it never outlives the harness that started it.

import { readFileSync } from "node:fs";
import { createServer } from "node:https";

import Provider from "oidc-provider";

function env(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`${name} is not set`);
    process.exit(2);
  }
  return value;
}

const clients = JSON.parse(readFileSync(env("CLIENTS"), "utf8")).map((c) => ({
  client_id: c.client_id,
  jwks: c.jwks,
  token_endpoint_auth_method: "private_key_jwt",
  grant_types: ["client_credentials"],
  response_types: [],
  redirect_uris: [],
}));

const server = createServer({ cert: readFileSync(env("TLS_CERT")), key: readFileSync(env("TLS_KEY")) });
// wrk keeps its connections open for the whole run; Node's default idle timeout is 5 s.
server.keepAliveTimeout = 120_000;
await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
const issuer = `https://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  clients,
  features: {
    clientCredentials: { enabled: true },
    devInteractions: { enabled: false },
  },
  ttl: { ClientCredentials: 300 },
});
provider.proxy = false;

// Errors the provider answers with stay visible (stderr) without failing anything here.
let errors = 0;
for (const event of ["server_error", "grant.error"]) {
  provider.on(event, (_ctx, err) => {
    errors += 1;
    if (errors <= 5) console.error(`${event}: ${err?.message} ${err?.error_description ?? ""}`);
  });
}

server.on("request", provider.callback());

console.log(issuer);
process.stdin.resume();
process.stdin.on("end", () => process.exit(0));
process.stdin.on("close", () => process.exit(0));

"""Sign in to a Latchkey app in the browser and print the user's Latchkey refresh token.

This is what the app's own login does (OpenID Connect authorization code + PKCE, scope
`openid offline_access`), reduced to a command: it listens on the app's loopback redirect URI,
prints the sign-in URL (and opens it in a browser unless --no-browser), waits for the browser
to come back with the code, checks `state` and `iss` (RFC 9207), redeems the code with the
app's client secret and the PKCE verifier, and prints the refresh token on stdout. Standard
library only.

  export AUTH0_DOMAIN=127.0.0.1:8750 AUTH0_CLIENT_ID=app_… AUTH0_CLIENT_SECRET=…
  export REQUESTS_CA_BUNDLE=latchkey-data/tls/ca.pem
  export LATCHKEY_REFRESH_TOKEN=$(python3 examples/python/sign_in.py)

--redirect-uri must be exactly one the app was registered with (`latchkey app add …
--redirect-uri`); default http://127.0.0.1:8751/callback. Messages go to stderr; exit 1 on
any failure.
"""

import argparse
import base64
import hashlib
import http.server
import json
import os
import secrets
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import webbrowser


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redirect-uri", default="http://127.0.0.1:8751/callback")
    parser.add_argument("--no-browser", action="store_true", help="only print the URL")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the browser")
    args = parser.parse_args()

    try:
        domain = os.environ["AUTH0_DOMAIN"]
        client_id = os.environ["AUTH0_CLIENT_ID"]
        client_secret = os.environ["AUTH0_CLIENT_SECRET"]
    except KeyError as e:
        fail(f"{e.args[0]} is not set (see examples/README.md)")
    issuer = f"https://{domain}/"
    cafile = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
    tls = ssl.create_default_context(cafile=cafile)

    redirect = urllib.parse.urlsplit(args.redirect_uri)
    if redirect.scheme != "http" or redirect.hostname not in ("127.0.0.1", "localhost", "::1"):
        fail("--redirect-uri must be http on a loopback address, e.g. http://127.0.0.1:8751/callback")

    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state = secrets.token_urlsafe(16)
    authorize = issuer + "authorize?" + urllib.parse.urlencode({
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": args.redirect_uri,
        "scope": "openid offline_access",
        "state": state,
        "nonce": secrets.token_urlsafe(16),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    })

    answer = {}

    class Callback(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the name http.server calls
            url = urllib.parse.urlsplit(self.path)
            if url.path != (redirect.path or "/"):
                self.send_error(404)
                return
            answer.update(urllib.parse.parse_qs(url.query))
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.end_headers()
            self.wfile.write(b"Signed in. You can close this tab.\n")

        def log_message(self, *_):
            pass

    try:
        server = http.server.HTTPServer((redirect.hostname, redirect.port or 80), Callback)
    except OSError as e:
        fail(f"cannot listen on {args.redirect_uri}: {e}")
    print(f"Sign in as the demo user here: {authorize}", file=sys.stderr, flush=True)
    if not args.no_browser:
        webbrowser.open(authorize)
    # Other requests (a browser's /favicon.ico) are answered 404 and waited past.
    deadline = time.monotonic() + args.timeout
    while not answer:
        left = deadline - time.monotonic()
        if left <= 0:
            fail(f"no sign-in within {args.timeout:.0f} s")
        server.timeout = left
        server.handle_request()
    server.server_close()

    def one(name):
        values = answer.get(name) or [None]
        return values[0]

    if one("error"):
        fail(f"sign-in refused: {one('error')}: {one('error_description') or ''}")
    if one("state") != state:
        fail("the answer's state is not ours")
    if one("iss") != issuer:
        fail(f"the answer names issuer {one('iss')!r}, expected {issuer!r}")
    if not one("code"):
        fail("the answer has no code")

    body = urllib.parse.urlencode({
        "grant_type": "authorization_code",
        "code": one("code"),
        "redirect_uri": args.redirect_uri,
        "code_verifier": verifier,
    }).encode()
    basic = base64.b64encode(
        f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(client_secret, safe='')}".encode()
    ).decode()
    request = urllib.request.Request(
        issuer + "oauth/token",
        data=body,
        headers={"Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"},
    )
    try:
        with urllib.request.urlopen(request, context=tls, timeout=30) as response:
            tokens = json.load(response)
    except urllib.error.HTTPError as e:
        fail(f"the token endpoint answered {e.code}: {e.read().decode(errors='replace')}")
    except urllib.error.URLError as e:
        fail(f"cannot reach {issuer}: {e.reason}")
    refresh = tokens.get("refresh_token")
    if not refresh:
        fail("no refresh token in the answer (the app must be allowed offline_access)")
    print("Signed in; the refresh token is on stdout.", file=sys.stderr)
    print(refresh)


if __name__ == "__main__":
    main()

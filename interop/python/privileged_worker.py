"""Privileged-worker token exchange through Auth0's own Python SDK (auth0-python), unchanged.

The SDK authenticates the agent with `client_assertion_signing_key` (private_key_jwt: it mints
the client assertion itself, aud = https://{domain}/), and sends a JSON body to
https://{domain}/oauth/token. The subject token is the privileged-worker JWT an agent signs
with its own key (typ: token-vault-req+jwt), built here with PyJWT, which auth0-python
depends on. Trust for Latchkey's local CA comes from REQUESTS_CA_BUNDLE.

Inputs (environment): LK_DOMAIN (host:port), LK_CLIENT_ID, LK_KEY_FILE (PKCS#8 PEM),
LK_USER_ID, LK_CONNECTION, optional LK_SCOPE. Prints the token response as JSON on stdout;
on an error response prints {"status", "error", "message"} and exits 3.
"""

import json
import os
import sys
import time
import uuid

import jwt
from auth0.authentication import GetToken
from auth0.authentication.exceptions import Auth0Error

domain = os.environ["LK_DOMAIN"]
client_id = os.environ["LK_CLIENT_ID"]
connection = os.environ["LK_CONNECTION"]
with open(os.environ["LK_KEY_FILE"]) as f:
    private_key = f.read()

now = int(time.time())
subject = jwt.encode(
    {
        "iss": client_id,
        "sub": os.environ["LK_USER_ID"],
        "aud": f"https://{domain}/",
        "iat": now,
        "exp": now + 60,
        "jti": str(uuid.uuid4()),
        "audit_context": "auth0-python interop test",
    },
    private_key,
    algorithm="RS256",
    headers={"typ": "token-vault-req+jwt"},
)

get_token = GetToken(
    domain,
    client_id,
    client_assertion_signing_key=private_key,
    client_assertion_signing_alg="RS256",
)
try:
    response = get_token.access_token_for_connection(
        subject_token_type="urn:ietf:params:oauth:token-type:jwt",
        subject_token=subject,
        requested_token_type="http://auth0.com/oauth/token-type/token-vault-access-token",
        connection=connection,
    )
except Auth0Error as e:
    print(json.dumps({"status": e.status_code, "error": e.error_code, "message": e.message}))
    sys.exit(3)
print(json.dumps(response))

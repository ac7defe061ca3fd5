"""CIBA through Auth0's own Python SDK (auth0-python), unchanged.

    python ciba.py start               BackChannelLogin.back_channel_login (form body)
    python ciba.py poll AUTH_REQ_ID    GetToken.backchannel_login (JSON body)

`start` sends `login_hint` as the JSON the AI SDKs write (with spaces), `binding_message`,
`scope=openid`, `requested_expiry`, optional RFC 9396 `authorization_details`, and
`audience=None` the way auth0-ai (Python) does when no audience is configured. The client
authenticates with its secret (LK_CLIENT_SECRET) or, with LK_KEY_FILE, with private_key_jwt
(the SDK mints the assertion). Trust for Latchkey's local CA comes from REQUESTS_CA_BUNDLE.

Inputs (environment): LK_DOMAIN (host:port), LK_CLIENT_ID, LK_CLIENT_SECRET or LK_KEY_FILE;
for `start` LK_USER_ID, LK_BINDING_MESSAGE, optional LK_REQUESTED_EXPIRY,
LK_AUTHORIZATION_DETAILS (JSON). Prints the SDK's answer as JSON on stdout; on an error
response prints {"status", "error", "message", "retry_after"} and exits 3.
"""

import json
import os
import sys

from auth0.authentication import GetToken
from auth0.authentication.back_channel_login import BackChannelLogin
from auth0.authentication.exceptions import Auth0Error

domain = os.environ["LK_DOMAIN"]
client_id = os.environ["LK_CLIENT_ID"]
auth = {}
if os.environ.get("LK_KEY_FILE"):
    with open(os.environ["LK_KEY_FILE"]) as f:
        auth = {"client_assertion_signing_key": f.read(), "client_assertion_signing_alg": "RS256"}
else:
    auth = {"client_secret": os.environ["LK_CLIENT_SECRET"]}

try:
    if sys.argv[1] == "start":
        login_hint = json.dumps(
            {"format": "iss_sub", "iss": f"https://{domain}/", "sub": os.environ["LK_USER_ID"]}
        )
        details = os.environ.get("LK_AUTHORIZATION_DETAILS")
        answer = BackChannelLogin(domain, client_id, **auth).back_channel_login(
            binding_message=os.environ["LK_BINDING_MESSAGE"],
            login_hint=login_hint,
            scope="openid",
            authorization_details=json.loads(details) if details else None,
            requested_expiry=int(os.environ.get("LK_REQUESTED_EXPIRY", "300")),
            audience=None,
        )
    elif sys.argv[1] == "poll":
        answer = GetToken(domain, client_id, **auth).backchannel_login(auth_req_id=sys.argv[2])
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
except Auth0Error as e:
    headers = e.headers or {}
    print(
        json.dumps(
            {
                "status": e.status_code,
                "error": e.error_code,
                "message": e.message,
                "retry_after": headers.get("Retry-After"),
            }
        )
    )
    sys.exit(3)
print(json.dumps(answer))

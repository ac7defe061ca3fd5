"""User-present token exchange through Auth0's Python SDK (auth0-python), unchanged: an app
trades the Latchkey refresh token of a signed-in user for the user's upstream access token
(auth0-wire.md T3–T5).

Inputs (environment): LK_DOMAIN (host:port), LK_CLIENT_ID, and LK_CLIENT_SECRET or LK_KEY_FILE
(PKCS#8 PEM: the SDK then authenticates with a client assertion it signs), LK_SUBJECT_TOKEN
(the refresh token), LK_CONNECTION, optional LK_LOGIN_HINT. Prints the token response as JSON;
on an error response prints {"status", "error", "message"} and exits 3.
"""

import json
import os
import sys

from auth0.authentication import GetToken
from auth0.authentication.exceptions import Auth0Error

domain = os.environ["LK_DOMAIN"]
client_id = os.environ["LK_CLIENT_ID"]
if os.environ.get("LK_KEY_FILE"):
    with open(os.environ["LK_KEY_FILE"]) as f:
        get_token = GetToken(domain, client_id, client_assertion_signing_key=f.read(), client_assertion_signing_alg="RS256")
else:
    get_token = GetToken(domain, client_id, client_secret=os.environ["LK_CLIENT_SECRET"])

try:
    response = get_token.access_token_for_connection(
        subject_token_type="urn:ietf:params:oauth:token-type:refresh_token",
        subject_token=os.environ["LK_SUBJECT_TOKEN"],
        requested_token_type="http://auth0.com/oauth/token-type/federated-connection-access-token",
        connection=os.environ["LK_CONNECTION"],
        login_hint=os.environ.get("LK_LOGIN_HINT"),
    )
except Auth0Error as e:
    print(json.dumps({"status": e.status_code, "error": e.error_code, "message": e.message}))
    sys.exit(3)
print(json.dumps(response))

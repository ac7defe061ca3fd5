"""CIBA through Auth0's server SDK for Python (auth0-server-python, from PyPI, unchanged):
ServerClient.login_backchannel (auth0-wire.md T44).

    python ciba_server.py

The SDK discovers `backchannel_authentication_endpoint`, posts there with HTTP Basic client
authentication (its default with a client secret), then polls the token endpoint every
`interval` seconds until the user decides, and keeps the tokens in its session store.

Inputs (environment): LK_DOMAIN (host:port), LK_CLIENT_ID, LK_CLIENT_SECRET, LK_USER_ID,
LK_BINDING_MESSAGE, SSL_CERT_FILE (httpx, which the SDK uses, trusts that CA file).

Prints one JSON object: {"ok": true, "result", "session", "sent"} or {"ok": false, "type",
"code", "message", "sent"}. "sent" lists the SDK's HTTP requests as seen by a passive wrapper
around httpx: method, URL, the Authorization scheme, body parameters (secrets never printed)
and the answer's status.
"""

import asyncio
import json
import os
import sys
from urllib.parse import parse_qsl

import httpx

from auth0_server_python.auth_server.server_client import ServerClient

# The in-memory session stores of the other auth0-server-python driver (same directory).
from server_python_driver import MemoryStateStore, MemoryTransactionStore

SENT = []


def spy_on_httpx():
    send = httpx.AsyncClient.send

    async def recorded(self, request, **kwargs):
        response = await send(self, request, **kwargs)
        body = request.content.decode(errors="replace") if request.content else ""
        params = dict(parse_qsl(body)) if body else {}
        for k in ("client_secret", "client_assertion"):
            if k in params:
                params[k] = "<secret>"
        auth = request.headers.get("authorization")
        SENT.append(
            {
                "method": request.method,
                "url": str(request.url),
                "authorization": auth.split(" ")[0] if auth else None,
                "params": params,
                "status": response.status_code,
            }
        )
        return response

    httpx.AsyncClient.send = recorded


async def main():
    spy_on_httpx()
    secret = "latchkey-interop-" + "s" * 32
    state_store = MemoryStateStore({"secret": secret})
    client = ServerClient(
        domain=os.environ["LK_DOMAIN"],
        client_id=os.environ["LK_CLIENT_ID"],
        client_secret=os.environ["LK_CLIENT_SECRET"],
        secret=secret,
        state_store=state_store,
        transaction_store=MemoryTransactionStore({"secret": secret}),
    )
    try:
        result = await client.login_backchannel(
            {
                "binding_message": os.environ["LK_BINDING_MESSAGE"],
                "login_hint": {"sub": os.environ["LK_USER_ID"]},
                "authorization_params": {"requested_expiry": 60},
            }
        )
    except Exception as e:  # noqa: BLE001 - report whatever the SDK raised
        return {
            "ok": False,
            "type": type(e).__name__,
            "code": getattr(e, "code", None),
            "message": str(e),
        }
    session = await state_store.get("_a0_session")
    session = session.dict() if hasattr(session, "dict") else session
    return {"ok": True, "result": result, "session": session}


if __name__ == "__main__":
    out = asyncio.run(main())
    out["sent"] = SENT
    print(json.dumps(out, default=str))
    sys.exit(0 if out["ok"] else 3)

"""Auth0's own server SDK (auth0-server-python, from PyPI, unchanged) as an app's server, pointed at
Latchkey: interactive login, the Connected Accounts flow, listing, the token-vault exchange and
deleting an account (auth0-wire.md T18, T19, T24-T33).

The test plays the browser, so the driver talks a line protocol, one JSON object per line:
  -> {"step": "login", "url": ...}        <- the callback URL the browser landed on
  -> {"step": "connect", "connection": ..., "url": ...}   <- the callback URL (with connect_code)
     (once per connection in LK_CONNECTIONS)
  -> {"step": "exchanged", "token": ...}  <- any line, once the test has used the token
  -> {"step": "done", ...results}
Any failure: {"step": "error", "where": ..., "type": ..., "message": ...} and exit code 3.

Environment: LK_DOMAIN (host:port), LK_CLIENT_ID, LK_CLIENT_SECRET, LK_REDIRECT_URI,
LK_CONNECTIONS (comma-separated; the first is the one exchanged and deleted), LK_SCOPES (how the
app configures its scopes, see `scope_config`) and SSL_CERT_FILE (httpx, which the SDK uses, trusts
that CA file).
"""

import asyncio
import copy
import json
import os
import sys

import httpx

from auth0_server_python.auth_server.server_client import ServerClient
from auth0_server_python.auth_types import ConnectAccountOptions, StartInteractiveLoginOptions
from auth0_server_python.error import AccessTokenForConnectionError, MyAccountApiError
from auth0_server_python.store.abstract import StateStore, TransactionStore


class MemoryStateStore(StateStore):
    """The session, in memory (the SDK ships no store: apps bring cookies or a database)."""

    def __init__(self, options):
        super().__init__(options)
        self.data = {}

    async def set(self, identifier, state, remove_if_expires=False, options=None):
        self.data[identifier] = copy.deepcopy(state)

    async def get(self, identifier, options=None):
        return copy.deepcopy(self.data.get(identifier))

    async def delete(self, identifier, options=None):
        self.data.pop(identifier, None)

    async def delete_by_logout_token(self, claims, options=None):
        self.data.clear()


class MemoryTransactionStore(TransactionStore):
    def __init__(self, options):
        super().__init__(options)
        self.data = {}

    async def set(self, identifier, state, remove_if_expires=False, options=None):
        self.data[identifier] = copy.deepcopy(state)

    async def get(self, identifier, options=None):
        return copy.deepcopy(self.data.get(identifier))

    async def delete(self, identifier, options=None):
        self.data.pop(identifier, None)


def log_the_wire():
    """With LK_WIRE_LOG set, every HTTP exchange the SDK makes goes to stderr (the SDK is
    unchanged: this wraps httpx, which it uses)."""
    send = httpx.AsyncClient.send

    async def logged(self, request, **kwargs):
        response = await send(self, request, **kwargs)
        await response.aread()
        body = request.content.decode(errors="replace") if request.content else ""
        sys.stderr.write(
            f">> {request.method} {request.url}\n"
            f"   authorization: {request.headers.get('authorization', '-')[:6]}...\n"
            f"   {body}\n"
            f"<< {response.status_code} {response.headers.get('content-type')}\n"
            f"   {response.text[:2000]}\n"
        )
        sys.stderr.flush()
        return response

    httpx.AsyncClient.send = logged


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def read_line():
    line = sys.stdin.readline()
    if not line:
        raise EOFError("stdin closed before the callback URL arrived")
    return line.strip()


def error_json(where, e):
    out = {"step": "error", "where": where, "type": type(e).__name__, "message": str(e)}
    for attr in ("code", "status", "title", "detail", "validation_errors", "cause"):
        value = getattr(e, attr, None)
        if value is not None:
            out[attr] = value if attr != "cause" else repr(value)
    return out


async def session_of(store):
    """The SDK's session as a dict (it stores a StateData model or, after updates, a dict)."""
    session = await store.get("_a0_session")
    return session.dict() if hasattr(session, "dict") else session


def dump(model):
    return model.model_dump(exclude_none=True)


LOGIN_SCOPE = "openid profile offline_access"
MY_ACCOUNT_SCOPES = "create:me:connected_accounts read:me:connected_accounts delete:me:connected_accounts"


def scope_config(domain):
    """The two ways an app configures scopes: `string` - one default scope string, which the SDK
    adds to every token request, the My Account refreshes included; `per-audience` - the SDK's
    Connected Accounts guide: default scopes per audience, the login's given at login.
    Returns the client's authorization_params and the login's."""
    if os.environ.get("LK_SCOPES", "string") == "string":
        return {"scope": LOGIN_SCOPE}, None
    return {"scope": {f"https://{domain}/me/": MY_ACCOUNT_SCOPES}}, {"scope": LOGIN_SCOPE}


async def main():
    if os.environ.get("LK_WIRE_LOG"):
        log_the_wire()
    domain = os.environ["LK_DOMAIN"]
    client_params, login_params = scope_config(domain)
    secret = "latchkey-interop-" + "s" * 32
    state_store = MemoryStateStore({"secret": secret})
    client = ServerClient(
        domain=domain,
        client_id=os.environ["LK_CLIENT_ID"],
        client_secret=os.environ["LK_CLIENT_SECRET"],
        secret=secret,
        redirect_uri=os.environ["LK_REDIRECT_URI"],
        state_store=state_store,
        transaction_store=MemoryTransactionStore({"secret": secret}),
        authorization_params=client_params,
    )
    connections = os.environ["LK_CONNECTIONS"].split(",")
    main_connection = connections[0]
    out = {"step": "done"}
    where = "start_interactive_login"
    try:
        login_options = StartInteractiveLoginOptions(authorization_params=login_params)
        emit({"step": "login", "url": await client.start_interactive_login(login_options)})
        where = "complete_interactive_login"
        login = await client.complete_interactive_login(read_line())
        state = login["state_data"]
        out["login"] = {
            "sub": state["user"]["sub"],
            "has_refresh_token": bool(state.get("refresh_token")),
            "scope": state["token_sets"][0]["scope"],
        }
        out["user"] = (await client.get_user())["sub"]

        # T24-T26, once per connection.
        out["completed"] = []
        for connection in connections:
            where = f"start_connect_account({connection})"
            url = await client.start_connect_account(
                ConnectAccountOptions(connection=connection, scopes=["repo:read"])
            )
            emit({"step": "connect", "connection": connection, "url": url})
            where = f"complete_connect_account({connection})"
            out["completed"].append(dump(await client.complete_connect_account(read_line())))

        # The My Account tokens the SDK got by refresh (audience https://{domain}/me/).
        session = await session_of(state_store)
        out["token_sets"] = sorted(
            ({"audience": t["audience"], "scope": t["scope"]} for t in session["token_sets"]),
            key=lambda t: (t["audience"], t["scope"] or ""),
        )

        # T30: all, filtered, and one at a time following the cursor.
        where = "list_connected_accounts"
        out["accounts"] = dump(await client.list_connected_accounts())
        out["accounts_filtered"] = dump(await client.list_connected_accounts(connection=main_connection))
        pages = [dump(await client.list_connected_accounts(take=1))]
        while pages[-1].get("next") and len(pages) < 5:
            pages.append(dump(await client.list_connected_accounts(take=1, from_param=pages[-1]["next"])))
        out["account_pages"] = pages

        # T32: the connections the user may connect, paged the same way.
        where = "list_connected_account_connections"
        out["connections"] = dump(await client.list_connected_account_connections())
        pages = [dump(await client.list_connected_account_connections(take=1))]
        while pages[-1].get("next") and len(pages) < 5:
            pages.append(
                dump(await client.list_connected_account_connections(take=1, from_param=pages[-1]["next"]))
            )
        out["connection_pages"] = pages

        # T18: the token-vault exchange (refresh token as the subject, HTTP Basic).
        where = "get_access_token_for_connection"
        out["connection_token"] = await client.get_access_token_for_connection({"connection": main_connection})
        session = await session_of(state_store)
        cached = [t for t in session["connection_token_sets"] if t["connection"] == main_connection]
        out["connection_token_scope"] = cached[0]["scope"]
        # 1.0.0b20 stores the connection token with expires_at = now (it reads `expires_in` from
        # its own already-converted result), so every call is an exchange: this one too.
        out["connection_token_again"] = await client.get_access_token_for_connection({"connection": main_connection})
        # The test tries the token at the provider while the account still exists.
        emit({"step": "exchanged", "token": out["connection_token"]})
        read_line()

        # T33: delete (the SDK requires exactly 204).
        where = "delete_connected_account"
        deleted = next(a["id"] for a in out["completed"] if a["connection"] == main_connection)
        await client.delete_connected_account(deleted)
        out["deleted"] = deleted
        out["accounts_after_delete"] = dump(await client.list_connected_accounts())

        # T19: the exchange now fails (no cached token is served, see above).
        where = "get_access_token_for_connection after delete"
        try:
            token = await client.get_access_token_for_connection({"connection": main_connection})
            out["after_delete"] = {"unexpected_token": token}
        except AccessTokenForConnectionError as e:
            out["after_delete"] = {"type": type(e).__name__, "code": e.code, "message": str(e)}
        # The same request without the SDK, to compare its message with what went over the wire.
        async with httpx.AsyncClient() as raw:
            response = await raw.post(
                f"https://{domain}/oauth/token",
                data={
                    "connection": main_connection,
                    "subject_token_type": "urn:ietf:params:oauth:token-type:refresh_token",
                    "subject_token": session["refresh_token"],
                    "requested_token_type": "http://auth0.com/oauth/token-type/federated-connection-access-token",
                    "grant_type": "urn:auth0:params:oauth:grant-type:token-exchange:federated-connection-access-token",
                    "client_id": os.environ["LK_CLIENT_ID"],
                },
                auth=(os.environ["LK_CLIENT_ID"], os.environ["LK_CLIENT_SECRET"]),
            )
            out["after_delete_wire"] = {
                "status": response.status_code,
                "content_type": response.headers.get("content-type"),
                "body": response.json(),
            }

        # Deleting it again: the My Account API's problem JSON, as the SDK reads it.
        where = "delete_connected_account again"
        try:
            await client.delete_connected_account(deleted)
            out["delete_again"] = {"unexpected": "success"}
        except MyAccountApiError as e:
            out["delete_again"] = {"status": e.status, "title": e.title, "detail": e.detail}
    except Exception as e:  # report anything, with where it happened
        emit(error_json(where, e))
        sys.exit(3)
    emit(out)


if __name__ == "__main__":
    asyncio.run(main())

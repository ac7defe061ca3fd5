"""Load an MCP client configuration (`mcpServers`, as Claude Desktop, Cursor and others read it),
start each server entry it names the way such a client would, and check that it works: the
tools are listed, `list_connections` shows the demo user's demo-git account as healthy, and
`call_api GET /user` answers the demo account's profile through Latchkey. Uses the official MCP
Python SDK (`mcp`, pinned in interop/python/requirements.txt).

  interop/.venv/bin/python examples/mcp/check.py                 # check examples/mcp/mcp.json
  interop/.venv/bin/python examples/mcp/check.py --print         # the config, filled in, to paste
  interop/.venv/bin/python examples/mcp/check.py --agent-token   # a fresh agent token (5 minutes)

Run it where `latchkey demo` runs (it reads ./latchkey-data). The config's placeholders are
filled in from the demo: `<latchkey>` (the binary: --latchkey, $LATCHKEY, `latchkey` on PATH,
or target/release/latchkey), `<data-dir>` (the demo's data directory, absolute), `<agent-id>`
(the demo agent, from demo.json) and `<agent-token>` (the agent's own Latchkey token, fetched
here with the agent's key: client credentials with private_key_jwt). --issuer replaces the
config's https://127.0.0.1:8750/ when the demo listens elsewhere. HTTP entries trust the
demo's CA (clients: SSL_CERT_FILE or NODE_EXTRA_CA_CERTS).

Prints `ok: NAME (stdio|http): …` per entry. Exit 0 only when every entry checked passes;
1 otherwise (for example when the demo account is not connected yet: the connect URL is
printed).
"""

import argparse
import json
import os
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import anyio
import httpx2
import jwt
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

HERE = Path(__file__).resolve().parent
DEFAULT_ISSUER = "https://127.0.0.1:8750/"
EXPECTED_LOGIN = "octo-demo"


class CheckFailed(Exception):
    pass


def latchkey_binary(given):
    if given:
        return given
    if os.environ.get("LATCHKEY"):
        return os.environ["LATCHKEY"]
    on_path = shutil.which("latchkey")
    if on_path:
        return on_path
    return str((HERE / "../../target/release/latchkey").resolve())


def agent_token(issuer, data_dir, agent_id, tls):
    """The agent's Latchkey token for the agent API (client credentials, private_key_jwt)."""
    key = (data_dir / "demo-agent.key").read_text()
    now = int(time.time())
    assertion = jwt.encode(
        {"iss": agent_id, "sub": agent_id, "aud": issuer, "iat": now, "exp": now + 60, "jti": str(uuid.uuid4())},
        key,
        algorithm="RS256",
    )
    body = urllib.parse.urlencode({
        "grant_type": "client_credentials",
        "client_id": agent_id,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
        "resource": issuer + "mcp",
    }).encode()
    try:
        with urllib.request.urlopen(issuer + "oauth/token", data=body, context=tls, timeout=30) as r:
            return json.load(r)["access_token"]
    except urllib.error.HTTPError as e:
        raise CheckFailed(f"the token endpoint answered {e.code}: {e.read().decode(errors='replace')}") from None
    except urllib.error.URLError as e:
        raise CheckFailed(f"cannot reach {issuer}: {e.reason}") from None


def fill(value, values):
    """The config with placeholders replaced, recursively."""
    if isinstance(value, str):
        for placeholder, v in values.items():
            if v is not None:
                value = value.replace(placeholder, v)
        return value
    if isinstance(value, list):
        return [fill(v, values) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, values) for k, v in value.items()}
    return value


def tool_json(result, what):
    if result.is_error:
        payload = result.structured_content or {}
        if payload.get("error") == "not_connected":
            raise CheckFailed(
                f"{what}: the demo account is not connected: open {payload.get('connect_url')} and approve"
            )
        text = " ".join(b.text for b in result.content if getattr(b, "type", None) == "text")
        raise CheckFailed(f"{what} failed: {payload or text}")
    return result.structured_content or {}


async def check_entry(name, entry, tls_ca):
    if "command" in entry:
        kind = "stdio"
        # Like Claude Desktop: the command with its args, the entry's env over a default one.
        server = StdioServerParameters(command=entry["command"], args=entry.get("args", []), env=entry.get("env"))
        http = None
    elif entry.get("url"):
        kind = "http"
        http = httpx2.AsyncClient(
            headers=entry.get("headers", {}),
            verify=ssl.create_default_context(cafile=tls_ca),
            timeout=httpx2.Timeout(30.0, read=300.0),
        )
        server = streamable_http_client(entry["url"], http_client=http)
    else:
        raise CheckFailed(f"neither a command nor a url")
    try:
        async with Client(server, read_timeout_seconds=60, cache=None) as client:
            tools = sorted(t.name for t in (await client.list_tools()).tools)
            for needed in ("list_connections", "call_api"):
                if needed not in tools:
                    raise CheckFailed(f"no {needed} tool among {tools}")
            listed = tool_json(await client.call_tool("list_connections", {}), "list_connections")
            demo = [c for c in listed.get("connections", []) if c.get("connection") == "demo-git"]
            if not demo:
                raise CheckFailed(f"list_connections has no demo-git: {listed}")
            healthy = [a for a in demo[0].get("accounts", []) if a.get("health") == "healthy"]
            if not healthy:
                raise CheckFailed(
                    f"the demo account is not connected: open {demo[0].get('connect_url')} and approve"
                )
            user = tool_json(
                await client.call_tool("call_api", {"connection": "demo-git", "method": "GET", "path": "/user"}),
                "call_api GET /user",
            )
            login = (user.get("json") or {}).get("login")
            if user.get("status") != 200 or login != EXPECTED_LOGIN:
                raise CheckFailed(f"call_api GET /user answered {user}")
    finally:
        if http is not None:
            await http.aclose()
    return f"ok: {name} ({kind}): {len(tools)} tools; demo-git healthy; GET /user -> {login}"


def first_error(exc):
    """The first real failure inside anyio's exception groups, as text."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, CheckFailed):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default=str(HERE / "mcp.json"))
    parser.add_argument("--data-dir", default=os.environ.get("LATCHKEY_DATA_DIR", "latchkey-data"))
    parser.add_argument("--issuer", default=os.environ.get("LATCHKEY_ISSUER", DEFAULT_ISSUER))
    parser.add_argument("--latchkey", help="the latchkey binary")
    parser.add_argument("--server", action="append", help="check only this entry (repeatable)")
    parser.add_argument("--print", action="store_true", help="print the filled-in config and exit")
    parser.add_argument("--agent-token", action="store_true", help="print a fresh agent token and exit")
    args = parser.parse_args(argv)

    issuer = args.issuer.rstrip("/") + "/"
    data_dir = Path(args.data_dir).resolve()
    ca = data_dir / "tls" / "ca.pem"
    try:
        info = json.loads((data_dir / "demo.json").read_text())
    except OSError as e:
        print(f"error: {e} (run this where `latchkey demo` runs, or pass --data-dir)", file=sys.stderr)
        return 1
    tls = ssl.create_default_context(cafile=str(ca))
    config = json.loads(Path(args.config).read_text())
    servers = config.get("mcpServers", {})
    if args.server:
        missing = [s for s in args.server if s not in servers]
        if missing:
            print(f"error: no entry {missing} in {args.config}", file=sys.stderr)
            return 1
        servers = {k: v for k, v in servers.items() if k in args.server}
    values = {
        DEFAULT_ISSUER: issuer,
        "<latchkey>": latchkey_binary(args.latchkey),
        "<data-dir>": str(data_dir),
        "<agent-id>": info["agent_id"],
    }
    try:
        if args.agent_token:
            print(agent_token(issuer, data_dir, info["agent_id"], tls))
            return 0
        if args.print:
            print(json.dumps(fill({**config, "mcpServers": servers}, values), indent=2))
            return 0
        if any("<agent-token>" in json.dumps(v) for v in servers.values()):
            values["<agent-token>"] = agent_token(issuer, data_dir, info["agent_id"], tls)
        failed = False
        for name, entry in fill(servers, values).items():
            try:
                print(anyio.run(check_entry, name, entry, str(ca)), flush=True)
            except Exception as e:  # noqa: BLE001 - one line per failed entry, then the next
                print(f"error: {name}: {first_error(e)}", file=sys.stderr, flush=True)
                failed = True
    except CheckFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 1 if failed or not servers else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

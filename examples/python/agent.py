"""A LangChain tool protected by Auth0's `auth0-ai-langchain` (`with_token_vault`), pointed at
Latchkey instead of Auth0 — the SDK is unchanged; only AUTH0_DOMAIN names Latchkey.

The tool needs the user's demo-git account. `with_token_vault` trades the user's Latchkey
refresh token (from signing in to the app: sign_in.py) at Latchkey's /oauth/token for a
short-lived upstream token (Auth0's Token Vault exchange, subject type refresh_token), and the
tool calls the demo provider's API with it. The tool is invoked directly, the way an agent
framework would call it (a tool call with an id, in a thread); no model is involved.

  export AUTH0_DOMAIN=127.0.0.1:8750 AUTH0_CLIENT_ID=app_… AUTH0_CLIENT_SECRET=…
  export REQUESTS_CA_BUNDLE=$PWD/latchkey-data/tls/ca.pem LATCHKEY_REFRESH_TOKEN=…
  examples/python/.venv/bin/python examples/python/agent.py

Prints what the tool found. Exit 0 only when the tool ran with an upstream token and the
demo account's profile and repositories came back (login `octo-demo`, repository
`hello-world`); 2 when the user has not connected demo-git yet (the SDK's Token Vault
interrupt: the connect URL is printed); 1 on anything else.
"""

import asyncio
import json
import os
import sys
import warnings

import langchain  # noqa: E402,F401 - installs LangChain's warning filters; ours goes in front

# langgraph warns about a default of its own on import; nothing this example can act on.
warnings.filterwarnings("ignore", message="The default value of `allowed_objects`")

import requests  # noqa: E402 - after the filter
from auth0_ai_langchain.auth0_ai import Auth0AI  # noqa: E402
from auth0_ai_langchain.token_vault import get_access_token_from_token_vault  # noqa: E402
from langchain_core.tools import StructuredTool  # noqa: E402
from langgraph.errors import GraphInterrupt  # noqa: E402

CONNECTION = "demo-git"


def fail(message, code=1):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


for name in ("AUTH0_DOMAIN", "AUTH0_CLIENT_ID", "AUTH0_CLIENT_SECRET", "LATCHKEY_REFRESH_TOKEN"):
    if not os.environ.get(name):
        fail(f"{name} is not set (see examples/README.md)")
DOMAIN = os.environ["AUTH0_DOMAIN"]
API = f"https://{DOMAIN}/demo/api"

# Auth0AI() reads AUTH0_DOMAIN, AUTH0_CLIENT_ID and AUTH0_CLIENT_SECRET; its HTTP client is
# `requests`, which trusts the CA in REQUESTS_CA_BUNDLE.
with_demo_git = Auth0AI().with_token_vault(
    connection=CONNECTION,
    scopes=["read:user", "repo:read"],
    refresh_token=os.environ["LATCHKEY_REFRESH_TOKEN"],
)


def demo_account_overview() -> str:
    """The demo account's profile and its repositories."""
    token = get_access_token_from_token_vault()
    headers = {"Authorization": f"Bearer {token}"}
    user = requests.get(f"{API}/user", headers=headers, timeout=10)
    user.raise_for_status()
    repos = requests.get(f"{API}/repos", headers=headers, timeout=10)
    repos.raise_for_status()
    return json.dumps({
        "login": user.json()["login"],
        "repositories": [r["name"] for r in repos.json()],
    })


overview = with_demo_git(
    StructuredTool.from_function(
        func=demo_account_overview,
        name="demo_account_overview",
        description="Show the user's demo-git profile and repositories.",
    )
)


async def main():
    # What an agent framework does with a model's tool call: invoke it with the call's id,
    # in a thread (the SDK keeps the exchanged token per thread).
    call = {"type": "tool_call", "id": "call-1", "name": overview.name, "args": {}}
    try:
        message = await overview.ainvoke(call, config={"configurable": {"thread_id": "examples-python"}})
    except GraphInterrupt as interrupt:
        value = interrupt.args[0][0].value
        fail(
            f"{value.get('message')}\n"
            f"connect the account first: open https://{DOMAIN}/connect/{value.get('connection', CONNECTION)}",
            code=2,
        )
    result = json.loads(message.content)
    print(json.dumps(result))
    if result.get("login") != "octo-demo" or "hello-world" not in result.get("repositories", []):
        fail(f"unexpected answer from the demo API: {result}")
    print(f"ok: {overview.name} ran with a token from Latchkey: {result['login']}, "
          f"{len(result['repositories'])} repositories", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())

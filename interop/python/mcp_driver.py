"""The official MCP Python SDK (`mcp` from PyPI, unchanged) as an MCP client of Latchkey, over
Streamable HTTP or stdio.

Usage:
  mcp_driver.py http URL [--header 'Name: value']... [--cafile PATH] [--mode MODE] [--timeout S]
                        [--elicitation]
  mcp_driver.py stdio [--mode MODE] [--timeout S] [--elicitation] -- COMMAND ARGS...

http: POSTs to URL with the given headers on every request (e.g. 'Authorization: Bearer ...'),
trusting only the CA in --cafile when given (else the system's). stdio: starts COMMAND as a child
process with this process's whole environment and talks MCP on its stdin/stdout; its stderr is
passed through to ours.

--mode is the SDK's connect policy: 'auto' (the SDK's default: probe `server/discover`, the
2026-07-28 lifecycle, and fall back to the `initialize` handshake), 'legacy' (always the
`initialize` handshake) or a modern protocol version such as '2026-07-28' (adopted without a
probe). --timeout bounds each MCP request, in seconds (default 60), so a stuck server fails the
driver instead of hanging it. --elicitation makes the client declare elicitation (form and URL
mode, as the SDK does when given an elicitation callback; the callback declines anything the
server asks in-band).

Line protocol, one JSON object per line on stdout (flushed after each):
  -> {"step": "tools", "tools": [names...], "protocol": negotiated version}   once connected
  <- {"tool": NAME, "args": {...}}                                            on stdin, any number
  -> {"step": "result", "is_error": bool, "structured": ..., "text": "..."}  one per tool line
  -> {"step": "elicitation", "message": ..., "elicitations": [...]}           instead, when the
     server answers a tool call with "URL elicitation required" (-32042)
End of stdin: the connection is closed and the driver exits 0.
Any failure (including a JSON-RPC error answering a tool call):
  -> {"step": "error", "type": ..., "message": ..., "code": JSON-RPC code or null}, exit code 1.
"""

import json
import os
import ssl
import sys

import anyio
import httpx2
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError, UrlElicitationRequiredError
from mcp_types import URL_ELICITATION_REQUIRED, ElicitResult

USAGE = (
    "usage: mcp_driver.py http URL [--header 'Name: value']... [--cafile PATH] [--mode MODE]"
    " [--timeout S]\n"
    "       mcp_driver.py stdio [--mode MODE] [--timeout S] -- COMMAND ARGS..."
)


def emit(obj):
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class UsageError(Exception):
    pass


def parse_args(argv):
    """Returns (transport, options). Options: url, headers, cafile, mode, timeout, command."""
    if not argv or argv[0] not in ("http", "stdio"):
        raise UsageError("first argument must be 'http' or 'stdio'")
    transport, rest = argv[0], argv[1:]
    command = None
    if transport == "stdio":
        if "--" not in rest:
            raise UsageError("stdio needs '-- COMMAND ARGS...'")
        cut = rest.index("--")
        rest, command = rest[:cut], rest[cut + 1 :]
        if not command:
            raise UsageError("stdio needs a COMMAND after '--'")
    opts = {
        "url": None, "headers": {}, "cafile": None, "mode": "auto", "timeout": 60.0, "command": command,
        "elicitation": False,
    }
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--elicitation":
            opts["elicitation"] = True
            i += 1
        elif arg in ("--header", "--cafile", "--mode", "--timeout"):
            if i + 1 >= len(rest):
                raise UsageError(f"{arg} needs a value")
            value = rest[i + 1]
            i += 2
            if arg == "--header":
                name, sep, val = value.partition(":")
                if not sep or not name.strip():
                    raise UsageError(f"--header wants 'Name: value', got {value!r}")
                opts["headers"][name.strip()] = val.strip()
            elif arg == "--cafile":
                opts["cafile"] = value
            elif arg == "--timeout":
                try:
                    opts["timeout"] = float(value)
                except ValueError:
                    raise UsageError(f"--timeout wants seconds, got {value!r}") from None
            else:
                opts["mode"] = value
        elif transport == "http" and opts["url"] is None and not arg.startswith("--"):
            opts["url"] = arg
            i += 1
        else:
            raise UsageError(f"unexpected argument {arg!r}")
    if transport == "http":
        if opts["url"] is None:
            raise UsageError("http needs a URL")
    elif opts["headers"] or opts["cafile"]:
        raise UsageError("--header and --cafile apply to http only")
    return transport, opts


def result_line(result):
    text = "\n".join(block.text for block in result.content if getattr(block, "type", None) == "text")
    return {"step": "result", "is_error": bool(result.is_error), "structured": result.structured_content, "text": text}


async def serve_lines(client):
    while True:
        line = await anyio.to_thread.run_sync(sys.stdin.readline)
        if not line:
            return
        if not line.strip():
            continue
        request = json.loads(line)
        if not isinstance(request, dict) or not isinstance(request.get("tool"), str):
            raise ValueError(f"want {{\"tool\": NAME, \"args\": {{...}}}}, got {line.strip()!r}")
        args = request.get("args") or {}
        try:
            result = await client.call_tool(request["tool"], args)
        except MCPError as e:
            if e.code != URL_ELICITATION_REQUIRED:
                raise
            asked = UrlElicitationRequiredError.from_error(e.error)
            emit({
                "step": "elicitation",
                "message": asked.message,
                "elicitations": [x.model_dump(by_alias=True, exclude_none=True) for x in asked.elicitations],
            })
            continue
        emit(result_line(result))


async def run(transport, opts):
    if transport == "http":
        verify = ssl.create_default_context(cafile=opts["cafile"]) if opts["cafile"] else True
        # The SDK's default timeouts (create_mcp_http_client): 30 s, and 300 s to read a stream.
        http = httpx2.AsyncClient(
            headers=opts["headers"], verify=verify, timeout=httpx2.Timeout(30.0, read=300.0)
        )
        async with http:
            target = streamable_http_client(opts["url"], http_client=http)
            await session(make_client(target, opts))
    else:
        command = opts["command"]
        params = StdioServerParameters(command=command[0], args=command[1:], env=dict(os.environ))
        await session(make_client(params, opts))


async def decline(_context, _params):
    return ElicitResult(action="decline")


def make_client(server, opts):
    # No response cache: every line is a fresh call to the server.
    return Client(
        server,
        mode=opts["mode"],
        read_timeout_seconds=opts["timeout"],
        cache=None,
        elicitation_callback=decline if opts["elicitation"] else None,
    )


async def session(client):
    async with client:
        tools = await client.list_tools()
        emit({"step": "tools", "tools": [tool.name for tool in tools.tools], "protocol": client.protocol_version})
        await serve_lines(client)


def error_line(exc):
    # anyio task groups wrap failures; report the first real one.
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    code = exc.code if isinstance(exc, MCPError) else None
    message = exc.message if isinstance(exc, MCPError) else (str(exc) or repr(exc))
    return {"step": "error", "type": type(exc).__name__, "message": message, "code": code}


def main(argv):
    try:
        transport, opts = parse_args(argv)
    except UsageError as e:
        emit({"step": "error", "type": "UsageError", "message": f"{e}\n{USAGE}", "code": None})
        return 1
    try:
        anyio.run(run, transport, opts)
    except BaseException as e:  # noqa: BLE001 - the contract is one error line, whatever failed
        if isinstance(e, KeyboardInterrupt):
            raise
        emit(error_line(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""Latchkey load benchmark: the credential-injecting proxy against calling the demo API directly.

What it does (see bench/README.md, "Proxy overhead", for the why):

 1. Starts `latchkey demo` on 127.0.0.1 with a fresh temporary data directory and connects the
    demo user's account to the built-in demo provider over HTTPS (login, consent, callback) —
    the same setup as bench/exchange.py, imported from it.
 2. Acts as the seeded demo agent (`demo-agent.key`, RS256, `private_key_jwt`) for everything:
    its agent token (`grant_type=client_credentials`) for the proxy, and a privileged-worker
    token exchange for the upstream token used by the direct call. Same agent, grant, user and
    upstream account on both paths.
 3. Checks before any load: `GET /healthz` is 200; the direct call `GET /demo/api/user` with the
    upstream token is 200 with the demo profile (`login` = octo-demo); the proxy call
    `GET /proxy/demo-git/user` with the agent token and `Latchkey-User` is 200 with the same
    JSON and no `Latchkey-Error`; the proxy without a token is 401.
 4. Measures, one after the other and with the same wrk settings, each after a short warm-up
    and with its token(s) fetched right before: (1) bare `GET /healthz`, (2) the direct call,
    (3) the proxy call; then a short single-connection run of each (latency without queueing).
    Every wrk run must end with no non-2xx answer and no socket error, or the benchmark fails.
 5. Reads the server's own counts (`/metrics`) and the audit trail (read-only): one
    `proxy.request` and one `proxy.response` entry per proxied 200, one upstream call each.
 6. Prints a table and appends a dated Markdown section to bench/results.md.

All traffic goes to 127.0.0.1 only; every wrk run is bounded by -d and a subprocess timeout;
the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import requests
from cryptography.hazmat.primitives import serialization

# The exchange benchmark's setup (server, demo account, signing, wrk runner) is reused as is.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from exchange import (  # noqa: E402
    BENCH_DIR,
    CONNECTION,
    REPO_DIR,
    Server,
    Signer,
    b64url,
    connect_demo_account,
    fs_of,
    https_session,
    log,
    machine_cpu,
    machine_info,
    ms,
    run_wrk,
)

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEMO_LOGIN = "octo-demo"  # the demo provider's only resource owner
PROXY_ROUTE = "/proxy/{connection}/{*path}"  # route templates in latchkey_http_requests_total
DEMO_ROUTE = "/demo/api/user"
SCENARIOS = ("healthz", "direct", "proxy")
LABELS = {
    "healthz": "`GET /healthz` (bare HTTPS)",
    "direct": "`GET /demo/api/user` (direct, upstream token)",
    "proxy": "`GET /proxy/demo-git/user` (through Latchkey)",
}


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------


def rsa_jwk_thumbprint(private_pem: bytes) -> str:
    """RFC 7638 SHA-256 thumbprint of the key's public JWK: the `kid` Latchkey gave the demo
    agent's key (it was registered without one)."""
    pub = serialization.load_pem_private_key(private_pem, password=None).public_key().public_numbers()

    def b64int(i: int) -> str:
        return b64url(i.to_bytes((i.bit_length() + 7) // 8, "big"))

    canonical = json.dumps({"e": b64int(pub.e), "kty": "RSA", "n": b64int(pub.n)}, separators=(",", ":"))
    return b64url(hashlib.sha256(canonical.encode()).digest())


def post_token(http: requests.Session, base: str, body: str | dict, what: str) -> dict:
    r = http.post(base + "oauth/token", data=body, timeout=10,
                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        j = r.json()
    except ValueError:
        j = {}
    if r.status_code != 200 or not j.get("access_token"):
        raise SystemExit(f"{what}: HTTP {r.status_code}\n{r.text[:1500]}")
    return j


def agent_token(http: requests.Session, base: str, signer: Signer, client_id: str, tag: str) -> dict:
    """The agent's own token (client credentials, `private_key_jwt`), for the agent API."""
    return post_token(http, base, {
        "grant_type": "client_credentials",
        "client_id": client_id,
        "client_assertion_type": CLIENT_ASSERTION_TYPE,
        "client_assertion": signer.assertion(tag),
        "resource": base + "mcp",
    }, "agent token (client_credentials)")


def upstream_token(http: requests.Session, base: str, signer: Signer, tag: str) -> dict:
    """The user's upstream token by the privileged-worker exchange (`private_key_jwt`)."""
    return post_token(http, base, signer.one(tag, "pkjwt"), "token exchange (upstream token)")


def write_headers(path: Path, headers: dict[str, str]) -> None:
    """Headers for wrk.lua's `get` mode; they carry tokens, so the file is private."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        for k, v in headers.items():
            f.write(f"{k}: {v}\n")


# --------------------------------------------------------------------------------------------
# Checks and counts
# --------------------------------------------------------------------------------------------


def check_profile(http: requests.Session, url: str, headers: dict[str, str], what: str) -> dict:
    r = http.get(url, headers=headers, timeout=10, allow_redirects=False)
    try:
        j = r.json()
    except ValueError:
        j = None
    if r.status_code != 200 or not isinstance(j, dict) or j.get("login") != DEMO_LOGIN:
        raise SystemExit(f"{what}: HTTP {r.status_code}, expected 200 with login={DEMO_LOGIN!r}\n"
                         f"headers: {dict(r.headers)}\n{r.text[:1500]}")
    if "latchkey-error" in {k.lower() for k in r.headers}:
        raise SystemExit(f"{what}: answered by Latchkey itself (Latchkey-Error: {r.headers['Latchkey-Error']})")
    return j


def route_200s(http: requests.Session, base: str) -> dict[str, int]:
    """The server's own count of GET 200s per route (`latchkey_http_requests_total`)."""
    r = http.get(base + "metrics", timeout=10)
    if r.status_code != 200:
        raise SystemExit(f"GET /metrics: HTTP {r.status_code}")
    out: dict[str, int] = {}
    # Route templates contain braces (`/proxy/{connection}/{*path}`): the label set ends at the last `}`.
    for labels, value in re.findall(r"^latchkey_http_requests_total\{(.*)\}\s+(\S+)$", r.text, re.M):
        if 'method="GET"' in labels and 'status="200"' in labels:
            m = re.search(r'route="([^"]*)"', labels)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0) + int(float(value))
    return out


def audit_counts(data_dir: Path) -> dict[str, int]:
    """Audit entries by `action/decision`, plus the proxy.response entries that note something
    (a refresh and retry, an answer cut or abandoned), read-only from the server's database."""
    db = sqlite3.connect(f"file:{data_dir / 'latchkey.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT action, decision, COUNT(*) FROM audit_events GROUP BY action, decision").fetchall()
        out = {f"{a}/{d}": n for a, d, n in rows}
        notes = db.execute(
            "SELECT COUNT(*) FROM audit_events WHERE action='proxy.response' AND reason LIKE '%ms; %'"
        ).fetchone()[0]
        out["proxy.response noted"] = notes
    finally:
        db.close()
    return out


def settled_audit(data_dir: Path, want_responses: int, limit: float = 60) -> tuple[dict[str, int], float]:
    """Audit counts once the `proxy.response` entries (written after each answer, in the
    background) stop growing or reach `want_responses`; and how long that took."""
    t0 = time.monotonic()
    last = audit_counts(data_dir)
    while time.monotonic() - t0 < limit:
        if last.get("proxy.response/allow", 0) + last.get("proxy.response/error", 0) >= want_responses:
            break
        time.sleep(0.5)
        now = audit_counts(data_dir)
        if now == last and time.monotonic() - t0 > 3:
            break
        last = now
    return last, time.monotonic() - t0


def log_findings(log_path: Path) -> list[str]:
    """WARN/ERROR lines of the server's log, grouped by message (first 200 characters)."""
    seen: dict[str, int] = {}
    try:
        for line in log_path.read_text(errors="replace").splitlines():
            if " WARN " in line or " ERROR " in line or "WARN" in line[:40] or "ERROR" in line[:40]:
                key = re.sub(r"^\S+\s+", "", line)[:200]
                key = re.sub(r"\d+(\.\d+)?(ms|µs|s)\b", "N\\2", key)
                seen[key] = seen.get(key, 0) + 1
    except OSError:
        return []
    return [f"{n}× {k}" for k, n in sorted(seen.items(), key=lambda kv: -kv[1])]


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def wrk_ok(res: dict, label: str) -> None:
    """Fail loudly on any non-2xx answer or socket error (wrk.lua echoes the first bodies)."""
    errs = {k: res[k] for k in ("err_connect", "err_read", "err_write", "err_timeout") if res[k]}
    if res["non200"] or errs or not res["responses_seen"]:
        detail = "\n".join(res["stderr"].strip().splitlines()[:6])
        raise SystemExit(f"{label}: {res['non200']} non-200 answers of {res['requests']}, socket errors {errs}, "
                         f"{res['responses_seen']} responses seen\n{detail}")


def measure(name: str, url: str, headers_file: Path | None, args, work: Path, pid: int) -> dict:
    """Warm-up, then the measured run with the shared settings."""
    t, c, d = args.threads, args.connections, args.duration
    lua = ["get"] + ([str(headers_file)] if headers_file else [])
    if args.warmup:
        warm = run_wrk(url, t, c, args.warmup, lua, f"{name}-warmup", work, pid)
        wrk_ok(warm, f"{name} warm-up")
    res = run_wrk(url, t, c, d, lua, name, work, pid)
    wrk_ok(res, name)
    res["cpu_us"] = res["server_cores"] / res["rps"] * 1e6 if res["rps"] else float("nan")
    log(f"{name}: {res['rps']:.0f} req/s, p50 {ms(res['p50_us'])}, p99 {ms(res['p99_us'])}, "
        f"server {res['server_cores']:.2f} cores ({res['cpu_us']:.0f} µs CPU a request)")
    return res


def probe(name: str, url: str, headers_file: Path | None, args, work: Path, pid: int) -> dict:
    """One connection, one request at a time: latency without queueing."""
    lua = ["get"] + ([str(headers_file)] if headers_file else [])
    res = run_wrk(url, 1, 1, args.probe, lua, f"{name}-c1", work, pid)
    wrk_ok(res, f"{name} (1 connection)")
    log(f"{name} (1 connection): {res['rps']:.0f} req/s, p50 {ms(res['p50_us'])}, p99 {ms(res['p99_us'])}")
    return res


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(REPO_DIR / "target" / "release" / "latchkey"))
    ap.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    ap.add_argument("--duration", type=int, default=10, help="seconds per measured run (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="seconds of warm-up before each run (default 3; 0: none)")
    ap.add_argument("--probe", type=int, default=5,
                    help="seconds of the single-connection latency run per endpoint (default 5; 0: none)")
    ap.add_argument("--latchkey-user", choices=("username", "id"), default="username",
                    help="name the demo user in Latchkey-User by username (default, as in docs/agent-api.md) or id")
    ap.add_argument("--results", default=str(BENCH_DIR / "results.md"), help="Markdown file to append to")
    ap.add_argument("--no-append", action="store_true", help="print the Markdown section only")
    ap.add_argument("--json", default=None, help="also write the figures as JSON to this file (bench/run)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--tmp-root", default=None,
                    help="parent of the temporary data dir (default: the system temp dir). Diagnostic only: "
                         "a tmpfs such as /dev/shm makes fsync free, so the audit writes are no longer durable")
    args = ap.parse_args()

    binary = Path(args.bin).resolve()
    if not binary.exists():
        raise SystemExit(f"{binary} not found: cargo build --release -p latchkey-cli")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    # Each token is fetched right before its scenario and must outlive warm-up + run + probe.
    per_scenario = args.warmup + args.duration + args.probe
    if per_scenario + 30 > 300:
        raise SystemExit("--warmup + --duration + --probe must stay under 270 s (tokens live 300 s)")

    started = dt.datetime.now(dt.timezone.utc)
    work = Path(tempfile.mkdtemp(prefix="latchkey-bench-proxy-", dir=args.tmp_root))
    data_dir = work / "data"
    data_dir.mkdir()
    server = Server(binary, data_dir, work / "server.log")
    signer = None
    failed = True
    try:
        server.wait_ready()
        base = f"https://127.0.0.1:{server.port}/"
        if server.issuer != base:
            raise SystemExit(f"server issuer is {server.issuer}, expected {base}")
        ca = data_dir / "tls" / "ca.pem"
        demo = json.loads((data_dir / "demo.json").read_text())
        log(f"server up at {base} (data dir {data_dir}, {fs_of(data_dir)})")

        connect_demo_account(base, ca, demo)
        log("demo account connected (upstream token cached)")

        private_pem = Path(demo["agent_key"]).read_bytes()
        ctx = {"client_id": demo["agent_id"], "client_secret": "", "kid": rsa_jwk_thumbprint(private_pem),
               "private_pem": private_pem, "user_id": demo["user_id"], "aud": server.issuer}
        signer = Signer(ctx, 0)  # single tokens only, signed in this process
        tag = f"bench-proxy-{os.getpid()}-{int(time.time())}"
        user = demo["username"] if args.latchkey_user == "username" else demo["user_id"]
        http = https_session(ca)
        urls = {"healthz": base + "healthz", "direct": base + "demo/api/user",
                "proxy": base + f"proxy/{CONNECTION}/user"}
        seq = iter(range(1_000_000))

        def fresh_headers(name: str) -> tuple[dict[str, str], int | None]:
            """The scenario's headers with a token fetched now, and the token's lifetime."""
            if name == "healthz":
                return {}, None
            if name == "direct":
                j = upstream_token(http, base, signer, f"{tag}-exchange-{next(seq)}")
                return {"Authorization": f"Bearer {j['access_token']}"}, j.get("expires_in")
            j = agent_token(http, base, signer, demo["agent_id"], f"{tag}-assertion-{next(seq)}")
            return {"Authorization": f"Bearer {j['access_token']}", "Latchkey-User": user}, j.get("expires_in")

        # Checks before any load.
        r = http.get(urls["healthz"], timeout=10)
        if r.status_code != 200:
            raise SystemExit(f"GET /healthz: HTTP {r.status_code}\n{r.text[:500]}")
        direct_h, direct_ttl = fresh_headers("direct")
        direct_json = check_profile(http, urls["direct"], direct_h, "direct call")
        log(f"direct call OK: login={direct_json['login']!r} (upstream token expires_in {direct_ttl})")
        proxy_h, agent_ttl = fresh_headers("proxy")
        proxy_json = check_profile(http, urls["proxy"], proxy_h, "proxy call")
        if proxy_json != direct_json:
            raise SystemExit(f"the proxy answered another profile than the direct call:\n{proxy_json}\n{direct_json}")
        log(f"proxy call OK: same profile as the direct call (agent token expires_in {agent_ttl})")
        r = http.get(urls["proxy"], headers={"Latchkey-User": user}, timeout=10)
        if r.status_code != 401:
            raise SystemExit(f"proxy call without a token: HTTP {r.status_code}, expected 401\n{r.text[:500]}")
        log("proxy call without a token: 401 (as expected)")
        del direct_h, proxy_h

        t, c, d = args.threads, args.connections, args.duration
        busy0, total0 = machine_cpu()
        time.sleep(2)
        busy1, total1 = machine_cpu()
        background = (busy1 - busy0) / max(1, total1 - total0)
        loadavg = Path("/proc/loadavg").read_text().split()[0]
        log(f"background CPU before the runs: {background * 100:.0f} % of all cores (loadavg {loadavg})")
        if background > 0.10:
            log("warning: the machine is not idle; results will be lower than on a quiet machine")

        results: dict[str, dict] = {}
        probes: dict[str, dict] = {}
        server_200s: dict[str, dict[str, int]] = {}
        ttls: dict[str, int | None] = {}
        for name in SCENARIOS:
            headers, ttl = fresh_headers(name)
            ttls[name] = ttl
            if ttl is not None and ttl < per_scenario + 10:
                raise SystemExit(f"{name}: the token expires in {ttl} s, before the {per_scenario} s of runs end")
            hfile = None
            if headers:
                hfile = work / f"headers-{name}.txt"
                write_headers(hfile, headers)
            before = route_200s(http, base)
            results[name] = measure(name, urls[name], hfile, args, work, server.proc.pid)
            if args.probe:
                probes[name] = probe(name, urls[name], hfile, args, work, server.proc.pid)
            after = route_200s(http, base)
            server_200s[name] = {k: after.get(k, 0) - before.get(k, 0) for k in (PROXY_ROUTE, DEMO_ROUTE)}
            if hfile:
                hfile.unlink()

        # The server's count of proxied 200s in the whole session, and the audit trail: one
        # proxy.request (written before the call goes out) and one proxy.response (written in
        # the background once the answer has been streamed) for each.
        srv = route_200s(http, base)
        proxied = srv.get(PROXY_ROUTE, 0)
        audit, drain_s = settled_audit(data_dir, proxied)
        log(f"audit after {drain_s:.1f} s: {audit}")
        failed = False
    finally:
        if signer:
            signer.close()
        server.stop()
        findings = log_findings(work / "server.log")
        if failed:
            for f in findings[:5]:
                log(f"server log: {f}")
            log(f"failed; kept {work} (server.log, wrk-*.txt) for diagnosis")

    b, dr, px = results["healthz"], results["direct"], results["proxy"]
    report = {
        "started": started, "info": machine_info(), "threads": t, "conns": c, "duration": d,
        "warmup": args.warmup, "probe": args.probe, "user_header": args.latchkey_user,
        "results": results, "probes": probes, "server_200s": server_200s, "ttls": ttls,
        "ratio": px["rps"] / dr["rps"] if dr["rps"] else float("nan"),
        "direct_bare": dr["rps"] / b["rps"] if b["rps"] else float("nan"),
        "proxy_bare": px["rps"] / b["rps"] if b["rps"] else float("nan"),
        "binary": f"{binary} (built {dt.datetime.fromtimestamp(binary.stat().st_mtime, dt.timezone.utc):%Y-%m-%d %H:%M UTC})",
        "background": background, "loadavg": loadavg, "fs": fs_of(work),
        "proxied": proxied, "demo_200s": srv.get(DEMO_ROUTE, 0), "audit": audit, "drain_s": drain_s,
        "findings": findings,
    }
    print()
    print(table(report))
    md = markdown(report)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "background": background, "ratio": report["ratio"], "checks_ok": audit_check(report)[1],
            **{n: {"rps": results[n]["rps"], "p50_ms": results[n]["p50_us"] / 1000,
                   "p99_ms": results[n]["p99_us"] / 1000, "cpu_us": results[n]["cpu_us"],
                   "one_conn_p50_ms": probes[n]["p50_us"] / 1000 if n in probes else None}
               for n in SCENARIOS},
        }, indent=1))
    if args.no_append:
        print()
        print(md)
    else:
        path = Path(args.results)
        with open(path, "a") as f:
            f.write("\n" + md)
        log(f"appended results to {path}")
    if args.keep:
        log(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if audit_check(report)[1] else 1


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def audit_check(r: dict) -> tuple[str, bool]:
    a = r["audit"]
    req, resp = a.get("proxy.request/allow", 0), a.get("proxy.response/allow", 0) + a.get("proxy.response/error", 0)
    ok = req == r["proxied"] == resp
    line = (f"The server answered {r['proxied']} proxied `GET` 200s in the session (checks, warm-up, run, "
            f"1-connection run; its `/metrics` count, which includes what wrk left in flight) and made "
            f"{r['server_200s']['proxy'][DEMO_ROUTE]} upstream calls during the proxy scenario for "
            f"{r['server_200s']['proxy'][PROXY_ROUTE]} proxied answers; the audit trail holds {req} `proxy.request` "
            f"and {resp} `proxy.response` entries ({a.get('proxy.response noted', 0)} with a note: retried, cut, "
            f"or abandoned by wrk at the end of a run), all written {r['drain_s']:.1f} s after the last run: "
            + ("**match**" if ok else "**MISMATCH**"))
    return line, ok


def delta(us: float) -> str:
    return f"{'+' if us >= 0 else '−'}{ms(abs(us))}"


def table(r: dict) -> str:
    res, pr = r["results"], r["probes"]
    rows = [("endpoint", "req/s", "p50", "p99", "requests", "server CPU", "CPU/request", "1-conn p50", "1-conn p99")]
    for n in SCENARIOS:
        x, p = res[n], pr.get(n)
        rows.append((n, f"{x['rps']:.0f}", ms(x["p50_us"]), ms(x["p99_us"]), str(x["requests"]),
                     f"{x['server_cores']:.2f} cores", f"{x['cpu_us']:.0f} µs",
                     ms(p["p50_us"]) if p else "-", ms(p["p99_us"]) if p else "-"))
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w[i]) if i else cell.ljust(w[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    dr, px = res["direct"], res["proxy"]
    lines += [
        "",
        f"background CPU before the runs: {r['background'] * 100:.0f} %",
        f"throughput proxy/direct: {r['ratio'] * 100:.1f} % (direct/bare {r['direct_bare'] * 100:.1f} %, "
        f"proxy/bare {r['proxy_bare'] * 100:.1f} %)",
        f"added latency at {r['conns']} connections: p50 {delta(px['p50_us'] - dr['p50_us'])}, "
        f"p99 {delta(px['p99_us'] - dr['p99_us'])}",
    ]
    if pr:
        lines.append(f"added latency at 1 connection: p50 {delta(pr['proxy']['p50_us'] - pr['direct']['p50_us'])}, "
                     f"p99 {delta(pr['proxy']['p99_us'] - pr['direct']['p99_us'])}")
    lines.append(f"added server CPU per call: {px['cpu_us'] - dr['cpu_us']:.0f} µs")
    lines.append(audit_check(r)[0].replace("`", "").replace("**", ""))
    for f in r["findings"][:5]:
        lines.append(f"server log: {f}")
    return "\n".join(lines)


def markdown(r: dict) -> str:
    res, pr, i = r["results"], r["probes"], r["info"]
    dr, px = res["direct"], res["proxy"]
    when = r["started"].strftime("%Y-%m-%d %H:%M UTC")

    def row(n: str) -> str:
        x, p = res[n], pr.get(n)
        one = f"{ms(p['p50_us'])} | {ms(p['p99_us'])}" if p else "— | —"
        return (f"| {LABELS[n]} | {x['rps']:.0f} | {ms(x['p50_us'])} | {ms(x['p99_us'])} | {ms(x['p999_us'])} | "
                f"{x['non200']} | {x['requests']} | {x['server_cores']:.2f} cores ({x['server_sys']:.2f} sys) | "
                f"{x['cpu_us']:.0f} µs | {x['machine_busy'] * 100:.0f} % | {one} |")

    out = [
        f"## {when} — proxy overhead — commit {i['commit']}",
        "",
        f"- Harness: `bench/proxy.py` (`bash bench/run.sh proxy`)",
        f"- Binary: `{r['binary']}` (release profile); commit is HEAD at run time, the working tree may differ",
        f"- Machine: {i['nproc']} cores, CPU `{i['cpu']}`; load generator on the same machine",
        f"- Background CPU in the 2 s before the runs: {r['background'] * 100:.0f} % of all cores "
        f"(1-min loadavg {r['loadavg']}){' — **machine not idle, numbers are pessimistic**' if r['background'] > 0.10 else ''}",
        f"- Data dir filesystem: {r['fs']} (SQLite WAL, `synchronous=FULL`)"
        + (" — **tmpfs: fsync is free, NOT durable; diagnostic only**" if r["fs"].startswith("tmpfs") else ""),
        f"- Load: `{i['wrk']}`, `-t{r['threads']} -c{r['conns']} -d{r['duration']}s --latency` after a "
        f"{r['warmup']} s warm-up, HTTPS keep-alive to 127.0.0.1; then `-t1 -c1 -d{r['probe']}s` per endpoint "
        f"(1-connection columns)",
        f"- Direct: the demo agent's upstream token from one privileged-worker exchange right before the run "
        f"(`expires_in` {r['ttls']['direct']} s). Proxy: the demo agent's token (`client_credentials`, "
        f"`private_key_jwt`, `expires_in` {r['ttls']['proxy']} s) with `Latchkey-User: <{r['user_header']}>`; "
        f"Latchkey forwards to `/demo/api/user` on the same server over HTTPS",
        "",
        "| endpoint | requests/s | p50 | p99 | p99.9 | non-2xx | requests | server CPU | server CPU a request "
        "| machine busy | 1-conn p50 | 1-conn p99 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        row("healthz"), row("direct"), row("proxy"),
        "",
        f"- Throughput proxy/direct: **{r['ratio'] * 100:.1f} %** (direct/bare {r['direct_bare'] * 100:.1f} %, "
        f"proxy/bare {r['proxy_bare'] * 100:.1f} %)",
        f"- Added latency at {r['conns']} connections (proxy − direct): p50 **{delta(px['p50_us'] - dr['p50_us'])}**, "
        f"p99 **{delta(px['p99_us'] - dr['p99_us'])}** (closed loop: mostly queueing behind the lower throughput)",
    ]
    if pr:
        out.append(f"- Added latency at 1 connection: p50 **{delta(pr['proxy']['p50_us'] - pr['direct']['p50_us'])}**, "
                   f"p99 **{delta(pr['proxy']['p99_us'] - pr['direct']['p99_us'])}**")
    out += [
        f"- Added server CPU per call: {px['cpu_us'] - dr['cpu_us']:.0f} µs (the server process also runs the demo "
        f"provider, so the proxy's figure includes the upstream call's own handling)",
        "- No target is asserted; the issue asks only that the overhead be measured",
        f"- Socket errors (connect/read/write/timeout): "
        + ", ".join(f"{n} {res[n]['err_connect']}/{res[n]['err_read']}/{res[n]['err_write']}/{res[n]['err_timeout']}"
                    for n in SCENARIOS),
        f"- {audit_check(r)[0]}",
    ]
    if r["findings"]:
        out.append("- Server log warnings/errors: " + "; ".join(f"`{f}`" for f in r["findings"][:5]))
    else:
        out.append("- Server log: no warnings or errors")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())

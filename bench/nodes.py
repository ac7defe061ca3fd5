#!/usr/bin/env python3
"""Latchkey load benchmark: the token exchange on SQLite (one node) and on PostgreSQL with 1, 2
and 3 nodes, in one run, each beside the bare GET /healthz of the same run.

What it does (see bench/README.md, "PostgreSQL and several nodes", for the why):

 1. SQLite: starts `latchkey demo` on a fresh data directory (exchange.py's setup, imported):
    demo account connected over HTTPS, agent `bench-agent` registered with a client secret and
    granted `read:user repo:read` on `demo-git`; one exchange checked and a replay refused.
    Measures GET /healthz (the baseline), then the exchange: warm-up, pre-signing one distinct
    body per request right before the run, measured run. Counts the releases and `jti`s in the
    SQLite database; stops the node.
 2. PostgreSQL: creates a fresh database on 127.0.0.1:5432, starts node 1 as `latchkey demo`
    on a fresh data directory with LATCHKEY_DATABASE_URL pointing at it, connects the demo
    account and registers an agent there (on the database), checks one exchange and a replay,
    and measures the exchange on that node alone.
 3. Starts node 2 (`latchkey serve`, same data directory: same key file and certificates, same
    database, LATCHKEY_PUBLIC_URL = node 1's issuer), checks that it releases, and that a body
    released by node 1 is refused by node 2; measures with one wrk per node at the same time,
    the connections split between them, each wrk with its own bodies. The same with node 3.
 4. GET /healthz once more on PostgreSQL node 1 (same wrk settings as the first): how much the
    machine's background changed during the run.
 5. Checks: 0 non-2xx and 0 socket errors in every measured run; every 200 the servers counted
    (`/metrics`) has its `token.release` audit entry and its `jti` consumed (psql on
    PostgreSQL); no upstream refresh during the measured runs.
 6. Prints one table with ratios (PostgreSQL n nodes / SQLite; each / healthz) and appends a
    dated Markdown section to bench/results.md. Drops the database, also on failure.

All traffic goes to 127.0.0.1 only; every wrk run is bounded by -d and a subprocess timeout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

# The exchange benchmark's setup (server, demo account, agent, signing, wrk runner) is reused.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from exchange import (  # noqa: E402
    BENCH_DIR,
    CONNECTION,
    REPO_DIR,
    SAFETY,
    SCOPES,
    SUBJECT_MAX_AGE,
    Server,
    Signer,
    check_exchange,
    connect_demo_account,
    db_counts,
    fs_of,
    https_session,
    log,
    machine_cpu,
    machine_info,
    ms,
    proc_cpu_s,
    register_agent,
    run_wrk,
    settled_token_200s,
    token_200s,
    write_bodies,
)
from proxy import log_findings  # noqa: E402

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
# Latchkey's advisory lock keys (crates/store/src/postgres/mod.rs, `locks`): (GLOBAL, AUDIT_CHAIN)
# serialises the audit chain's appends, so every release, cluster-wide; (GLOBAL, CONFIG) and
# (ACCOUNT, hashtext(id)) are taken shared by releases.
LK_GLOBAL, LK_AUDIT_CHAIN, LK_CONFIG, LK_ACCOUNT = 0x4C4B0000, 1, 2, 0x4C4B0001
# The demo provider's access tokens: long enough that no refresh (on demand or by the
# background refresher, 120 s ahead of expiry) falls in the run.
DEMO_TOKEN_TTL = 1800


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


class Pg:
    """psql against the machine's PostgreSQL (trust auth) and one fresh database for the run."""

    def __init__(self, host: str, port: int, user: str):
        self.host, self.port, self.user = host, port, user
        self.db: str | None = None

    def psql(self, sql: str, db: str | None = None, timeout: float = 60) -> str:
        cmd = ["psql", "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", db or self.db or "postgres",
               "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "PGCONNECT_TIMEOUT": "10"})
        if out.returncode != 0:
            raise SystemExit(f"psql failed ({out.returncode}): {sql}\n{out.stderr.strip()}")
        return out.stdout.strip()

    def ensure_up(self) -> None:
        def ready() -> bool:
            r = subprocess.run(["pg_isready", "-h", self.host, "-p", str(self.port), "-t", "5"],
                               capture_output=True, text=True, timeout=30)
            return r.returncode == 0

        if ready():
            return
        versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
        if not versions or shutil.which("pg_ctlcluster") is None:
            raise SystemExit(f"PostgreSQL is not answering on {self.host}:{self.port}")
        log(f"PostgreSQL is down: pg_ctlcluster {versions[-1]} main start")
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"],
                       capture_output=True, text=True, timeout=120)
        for _ in range(30):
            if ready():
                return
            time.sleep(1)
        raise SystemExit(f"PostgreSQL did not come up on {self.host}:{self.port}")

    def create(self, name: str) -> str:
        self.psql(f'CREATE DATABASE "{name}"', db="postgres")
        self.db = name
        return f"postgres://{self.user}@{self.host}:{self.port}/{name}"

    def drop(self) -> None:
        if self.db:
            name, self.db = self.db, None
            self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', db="postgres")
            log(f"dropped database {name}")

    def settings(self) -> dict:
        keys = ("server_version", "synchronous_commit", "fsync", "wal_sync_method", "max_connections",
                "data_directory", "shared_buffers")
        vals = self.psql("SELECT " + ", ".join(f"current_setting('{k}')" for k in keys), db="postgres").split("|")
        return dict(zip(keys, vals))

    def cpu_pids(self) -> list[int]:
        """This database's backends (the nodes' pools) and the server's own background processes
        (WAL writer, checkpointer, …): whose CPU counts as PostgreSQL's in a run."""
        out = self.psql(
            "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND "
            f"(datname = '{self.db}' OR (datname IS NULL AND backend_type <> 'client backend'))"
        )
        return [int(p) for p in out.split()]

    def waits(self) -> dict[str, int]:
        """What this database's backends are doing now (`state` / wait event), and which of
        Latchkey's advisory locks (crates/store/src/postgres/mod.rs `locks`) those waiting on
        one wait for, in one query: keys `act:…` and `lock:…`."""
        out = self.psql(
            "SELECT 'act', CASE WHEN state = 'idle' THEN 'idle' ELSE coalesce(state, '?') || ' (' || "
            "coalesce(wait_event_type || ':' || wait_event, 'running') || ')' END, count(*) "
            f"FROM pg_stat_activity WHERE datname = '{self.db}' AND pid <> pg_backend_pid() GROUP BY 1, 2 "
            "UNION ALL SELECT 'lock', CASE "
            f"WHEN l.classid = {LK_GLOBAL} AND l.objid = {LK_AUDIT_CHAIN} THEN 'audit chain' "
            f"WHEN l.classid = {LK_GLOBAL} AND l.objid = {LK_CONFIG} THEN 'configuration' "
            f"WHEN l.classid = {LK_ACCOUNT} THEN 'account' ELSE 'other' END, count(*) "
            "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            f"WHERE a.datname = '{self.db}' AND l.locktype = 'advisory' AND NOT l.granted GROUP BY 1, 2"
        )
        res: dict[str, int] = {}
        for line in out.splitlines():
            kind, key, n = line.split("|")
            res[f"{kind}:{key}"] = res.get(f"{kind}:{key}", 0) + int(n)
        return res


def cpu_of(pids: list[int]) -> dict[int, float]:
    out = {}
    for p in pids:
        try:
            u, s = proc_cpu_s(p)
            out[p] = u + s
        except (OSError, IndexError, ValueError):
            pass
    return out


class WaitSampler:
    """Samples pg_stat_activity every `every` seconds during a run (a psql call each)."""

    def __init__(self, pg: Pg, every: float = 0.5):
        self.pg, self.every = pg, every
        self.samples: list[dict[str, int]] = []
        self.stop_ev = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop_ev.wait(self.every):
            try:
                self.samples.append(self.pg.waits())
            except (SystemExit, subprocess.SubprocessError, OSError):
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_ev.set()
        self.thread.join(timeout=30)

    def average(self) -> dict[str, float]:
        if not self.samples:
            return {}
        keys = {k for s in self.samples for k in s}
        return {k: sum(s.get(k, 0) for s in self.samples) / len(self.samples) for k in keys}


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------


def node_env(database_url: str | None, public_url: str | None, pool_size: int | None) -> dict[str, str]:
    """The environment of a node: this one without any LATCHKEY_* setting, plus the node's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATCHKEY_")}
    env["LATCHKEY_DEMO_ACCESS_TOKEN_TTL"] = str(DEMO_TOKEN_TTL)
    if database_url:
        env["LATCHKEY_DATABASE_URL"] = database_url
    if public_url:
        env["LATCHKEY_PUBLIC_URL"] = public_url
    if pool_size:
        env["LATCHKEY_DATABASE_POOL_SIZE"] = str(pool_size)
    return env


def metric_sum(http: requests.Session, base: str, name: str, **labels: str) -> int:
    r = http.get(base + "metrics", timeout=10)
    if r.status_code != 200:
        raise SystemExit(f"GET {base}metrics: HTTP {r.status_code}")
    n = 0
    for lab, value in re.findall(r"^%s(?:\{([^}]*)\})?\s+(\S+)$" % re.escape(name), r.text, re.M):
        if all(f'{k}="{v}"' in (lab or "") for k, v in labels.items()):
            n += int(float(value))
    return n


def refreshes(http: requests.Session, bases: list[str]) -> int:
    """Upstream refreshes (on demand and background) the nodes made so far, by their count."""
    return sum(metric_sum(http, b, "latchkey_upstream_refreshes_total") for b in bases)


def cluster_200s(http: requests.Session, bases: list[str]) -> int:
    """The nodes' own count of POST /oauth/token 200s, summed (once in-flight ones finished)."""
    total = 0
    for b in bases:
        n = settled_token_200s(http, b)
        if n is None:
            raise SystemExit(f"GET {b}metrics failed")
        total += n
    return total


def exchange_once(http: requests.Session, base: str, body: str) -> tuple[int, str]:
    r = http.post(base + "oauth/token", data=body, headers=FORM, timeout=10)
    try:
        err = r.json().get("error", "") if r.status_code != 200 else ""
    except ValueError:
        err = r.text[:200]
    return r.status_code, err


def check_new_node(http: requests.Session, first: str, node: str, signer: Signer, tag: str) -> dict:
    """A node that joined: it releases, and it refuses a body node 1 already released."""
    status, err = exchange_once(http, node, signer.one(f"{tag}-own"))
    if status != 200:
        raise SystemExit(f"exchange on the new node {node}: HTTP {status} {err}")
    body = signer.one(f"{tag}-cross")
    s1, _ = exchange_once(http, first, body)
    s2, err2 = exchange_once(http, node, body)
    ok = s1 == 200 and s2 == 400
    log(f"new node {node}: exchange 200; body released by node 1 ({s1}) replayed on it: {s2} {err2} "
        f"({'ok' if ok else 'UNEXPECTED'})")
    if not ok:
        raise SystemExit(f"cross-node replay check failed: node 1 {s1}, new node {s2} {err2}")
    return {"status": f"{s2} {err2}".strip(), "ok200": 2}


# --------------------------------------------------------------------------------------------
# Load over one or several nodes
# --------------------------------------------------------------------------------------------


# What sqlx logs when the ROLLBACK of a dropped transaction finds it already committed: a
# request whose handler was cancelled (wrk closed the connection when it stopped) after its
# release's COMMIT had been sent. That release is committed and audited but was never answered,
# so the nodes' /metrics do not count it as a 200.
CANCELLED_AFTER_COMMIT = "there is no transaction in progress"


def cancelled_after_commit(work: Path) -> int:
    n = 0
    for f in work.glob("pg-node*.log"):
        try:
            n += f.read_text(errors="replace").count(CANCELLED_AFTER_COMMIT)
        except OSError:
            pass
    return n


def release_check(what: str, committed: int, answered: int, bound: int, logged: int | None = None,
                  noun: str = "`jti`s consumed") -> tuple[str, bool]:
    """Releases the database holds against the 200s the nodes counted. Every 200 must have its
    release; a release may lack its 200 only for a request wrk abandoned when it stopped (its
    handler was cancelled once the release was committed), so at most one per connection per
    wrk run."""
    extra = committed - answered
    ok = 0 <= extra <= bound
    text = (f"{what}: {committed} {noun}, {answered} 200s counted by the node(s)"
            + (f"; {extra} committed for requests wrk abandoned when it stopped (at most {bound}: one per "
               f"connection per wrk run)" if extra else "")
            + (f", {logged} of them named by the nodes' logs" if logged is not None and extra else ""))
    return text, ok


def sign_until(signer: Signer, tag: str, n: int, budget: float, chunk: int = 2000) -> tuple[list[str], float]:
    """Up to `n` bodies, in chunks, stopping once `budget` seconds are spent: the machine is
    shared, so signing can slow down after the rate was probed, and a body must still be
    younger than the 60 s `iat` limit (and its `jti` still stored) when the run ends."""
    t0 = time.monotonic()
    bodies: list[str] = []
    i = 0
    while len(bodies) < n and time.monotonic() - t0 < budget:
        part, _ = signer.batch(f"{tag}-c{i}", min(chunk, n - len(bodies)))
        bodies.extend(part)
        i += 1
    return bodies, time.monotonic() - t0


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def parallel_wrk(jobs: list[dict], duration: int, work: Path) -> list[dict]:
    """One wrk per node at the same time (run_wrk in threads: each waits on its own process)."""
    results: list[dict | None] = [None] * len(jobs)
    errors: list[BaseException] = []

    def one(i: int, j: dict) -> None:
        try:
            results[i] = run_wrk(j["url"], j["threads"], j["conns"], duration, j["lua"], j["label"], work, j["pid"])
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the main thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


def combine(parts: list[dict]) -> dict:
    """Sum of the nodes' counts; latency percentiles are the worst node's."""
    keys_sum = ("requests", "non200", "exhausted", "err_connect", "err_read", "err_write", "err_timeout",
                "responses_seen", "bodies_used", "server_cores", "server_sys")
    out = {k: sum(p[k] for p in parts) for k in keys_sum}
    out["ok"] = sum(p["ok"] for p in parts)
    out["ok_rps"] = sum(p["ok_rps"] for p in parts)
    out["rps"] = sum(p["rps"] for p in parts)
    for k in ("p50_us", "p90_us", "p99_us", "p999_us", "lat_max_us"):
        out[k] = max(p[k] for p in parts)
    out["machine_busy"] = sum(p["machine_busy"] for p in parts) / len(parts)
    out["duration_us"] = max(p["duration_us"] for p in parts)
    out["socket_errors"] = out["err_connect"] + out["err_read"] + out["err_write"] + out["err_timeout"]
    return out


def measure(signer: Signer, label: str, nodes: list[Server], args, tag: str, work: Path, pg: Pg | None) -> dict:
    """Warm-up, sizing, signing right before, measured run, over `nodes` at once.

    As exchange.py's measure_exchange, with the batch split over the nodes by their share of
    the connections (each node's wrk reads its own file: no body is sent twice)."""
    n, t, c, d = len(nodes), args.threads, args.connections, args.duration
    conns = split(c, n)
    threads = [max(1, min(t // n, ci)) for ci in conns]
    urls = [f"https://127.0.0.1:{s.port}/oauth/token" for s in nodes]

    probe, probe_s = signer.batch(f"{tag}-probe", 2000 * args.sign_workers)
    sign_rate = len(probe) / probe_s
    sign_budget = SUBJECT_MAX_AGE - SAFETY - d
    max_bodies = int(sign_rate * sign_budget)
    log(f"{label}: signing rate {sign_rate:.0f} bodies/s; at most {max_bodies} bodies for the run")

    def files(bodies: list[str], kind: str) -> list[Path]:
        # Each node's share of the connections gets that share of the bodies (the last the rest).
        paths, at = [], 0
        for i, share in enumerate(len(bodies) * ci // c for ci in conns):
            chunk = bodies[at:at + share] if i < n - 1 else bodies[at:]
            at += share
            p = work / f"bodies-{tag}-{kind}-node{i + 1}.txt"
            write_bodies(p, chunk)
            paths.append(p)
        return paths

    def jobs(paths: list[Path], kind: str) -> list[dict]:
        return [{"url": urls[i], "threads": threads[i], "conns": conns[i], "pid": nodes[i].proc.pid,
                 "lua": ["post", str(paths[i]), str(threads[i])], "label": f"{tag}-{kind}-node{i + 1}"}
                for i in range(n)]

    # Warm-up (also fills the nodes' database pools), sized to the signing rate.
    warm_n = max(len(probe), min(max_bodies, int(sign_rate * args.warmup)))
    extra, _ = sign_until(signer, f"{tag}-warm", warm_n - len(probe), args.warmup + 5)
    warm_paths = files(probe + extra, "warm")
    del probe, extra
    warm = combine(parallel_wrk(jobs(warm_paths, "warm"), args.warmup, work))
    if warm["exhausted"]:
        est = 2 * warm["bodies_used"] / (warm["duration_us"] / 1e6)
        log(f"{label}: warm-up used up its bodies; sizing for {est:.0f}/s")
    else:
        est = warm["ok_rps"]
        log(f"{label}: warm-up {warm['ok_rps']:.0f} exchanges/s ({warm['non200']} non-200)")

    want = int(math.ceil(1.5 * est * d)) + 100 * c
    count = min(want, max_bodies)
    bodies, sign_s = sign_until(signer, f"{tag}-run", count, sign_budget)
    count = len(bodies)
    capped = count < want
    if capped:
        log(f"{label}: batch capped at {count} bodies (want {want}) by the 60 s iat limit")
    run_paths = files(bodies, "run")
    del bodies
    log(f"{label}: signed {count} bodies in {sign_s:.1f} s over {n} node(s) ({', '.join(map(str, conns))} connections)")

    pg_pids = pg.cpu_pids() if pg else []
    pg0 = cpu_of(pg_pids)
    t0 = time.monotonic()
    sampler = WaitSampler(pg) if pg else None
    if sampler:
        with sampler:
            parts = parallel_wrk(jobs(run_paths, "run"), d, work)
    else:
        parts = parallel_wrk(jobs(run_paths, "run"), d, work)
    wall = time.monotonic() - t0
    pg1 = cpu_of(pg_pids)
    res = combine(parts)
    res["pg_cores"] = (sum(pg1[p] - pg0[p] for p in pg1 if p in pg0) / wall) if pg else None
    res["pg_waits"] = sampler.average() if sampler else {}
    res["pg_samples"] = len(sampler.samples) if sampler else 0
    res.update(parts=parts, conns=conns, threads=threads, bodies=count, sign_s=sign_s, sign_rate=sign_rate,
               warm_rps=warm["ok_rps"], warm_ok=warm["ok"], capped=capped, nodes=n, label=label)
    for f in warm_paths + run_paths:
        f.unlink(missing_ok=True)
    log(f"{label}: {res['ok_rps']:.0f} exchanges/s ({res['non200']} non-200, {res['socket_errors']} socket errors), "
        f"p50 {ms(res['p50_us'])}, p99 {ms(res['p99_us'])} (worst node), Latchkey {res['server_cores']:.2f} cores"
        + (f", PostgreSQL {res['pg_cores']:.2f} cores" if pg else ""))
    return res


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def background_cpu() -> tuple[float, str]:
    busy0, total0 = machine_cpu()
    time.sleep(2)
    busy1, total1 = machine_cpu()
    return (busy1 - busy0) / max(1, total1 - total0), Path("/proc/loadavg").read_text().split()[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(REPO_DIR / "target" / "release" / "latchkey"))
    ap.add_argument("--threads", type=int, default=2, help="wrk threads in all (default 2; at least 1 per node)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections in all, split over the nodes")
    ap.add_argument("--duration", type=int, default=10, help="seconds per measured run (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="seconds of warm-up before each exchange run (default 3)")
    ap.add_argument("--sign-workers", type=int, default=2)
    ap.add_argument("--nodes", type=int, default=3, help="PostgreSQL runs with 1..NODES nodes (default 3)")
    ap.add_argument("--pool-size", type=int, default=None,
                    help="LATCHKEY_DATABASE_POOL_SIZE for every node (default: the server's, 10)")
    ap.add_argument("--pg-host", default="127.0.0.1")
    ap.add_argument("--pg-port", type=int, default=5432)
    ap.add_argument("--pg-user", default="postgres")
    ap.add_argument("--results", default=str(BENCH_DIR / "results.md"), help="Markdown file to append to")
    ap.add_argument("--no-append", action="store_true", help="print the Markdown section only")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, wrk output)")
    ap.add_argument("--tmp-root", default=None, help="parent of the temporary data dirs (default: system temp)")
    args = ap.parse_args()

    binary = Path(args.bin).resolve()
    if not binary.exists():
        raise SystemExit(f"{binary} not found: cargo build --release -p latchkey-cli")
    for tool in ("wrk", "psql", "pg_isready"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found")
    if args.duration + SAFETY >= SUBJECT_MAX_AGE:
        raise SystemExit(f"--duration must be below {SUBJECT_MAX_AGE - SAFETY}s (subject tokens expire at 60 s)")
    if not 1 <= args.nodes <= args.connections:
        raise SystemExit("--nodes must be between 1 and --connections")

    # `timeout` ends the harness with SIGTERM: run the `finally` below (nodes stopped, database dropped).
    def on_term(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    started = dt.datetime.now(dt.timezone.utc)
    stamp = f"{os.getpid()}-{int(time.time())}"
    work = Path(tempfile.mkdtemp(prefix="latchkey-bench-nodes-", dir=args.tmp_root))
    pg = Pg(args.pg_host, args.pg_port, args.pg_user)
    t, c, d = args.threads, args.connections, args.duration
    servers: list[Server] = []
    signer: Signer | None = None
    failed = True
    rows: dict[str, dict] = {}
    checks: list[tuple[str, bool]] = []
    notes: dict = {}
    try:
        # ---------------------------------------------------------------- SQLite, one node
        sq_dir = work / "sqlite"
        sq_dir.mkdir()
        sq = Server(binary, sq_dir, work / "sqlite.log", "demo", node_env(None, None, None))
        servers.append(sq)
        sq.wait_ready()
        sq_base = f"https://127.0.0.1:{sq.port}/"
        ca = sq_dir / "tls" / "ca.pem"
        demo = json.loads((sq_dir / "demo.json").read_text())
        log(f"SQLite node up at {sq_base} (data dir on {fs_of(sq_dir)})")
        connect_demo_account(sq_base, ca, demo)
        agent = register_agent(binary, sq_dir, work, env=node_env(None, None, None))
        signer = Signer({**agent, "user_id": demo["user_id"], "aud": sq.issuer}, args.sign_workers)
        http = https_session(ca)
        tag = f"bench-{stamp}-sqlite"
        _, replay_ok, replay_status = check_exchange(http, sq_base, signer, tag, "secret")
        checks.append((f"SQLite: a replayed body is refused ({replay_status})", replay_ok))

        background, loadavg = background_cpu()
        notes.update(background=background, loadavg=loadavg, sqlite_fs=fs_of(sq_dir))
        log(f"background CPU before the runs: {background * 100:.0f} % of all cores (loadavg {loadavg})")

        rows["healthz"] = run_wrk(sq_base + "healthz", t, c, d, ["get"], "healthz", work, sq.proc.pid)
        log(f"healthz: {rows['healthz']['rps']:.0f} req/s, p99 {ms(rows['healthz']['p99_us'])}")

        ref0 = refreshes(http, [sq_base])
        srv0 = cluster_200s(http, [sq_base])
        rows["sqlite"] = measure(signer, "SQLite, 1 node", [sq], args, f"{tag}-ph", work, None)
        srv1 = cluster_200s(http, [sq_base])
        audit, _, phase_jtis = db_counts(sq_dir, f":{tag}-ph-")
        rows["sqlite"]["srv_200"] = srv1 - srv0
        rows["sqlite"]["jtis"] = phase_jtis
        rows["sqlite"]["cancelled"] = phase_jtis - (srv1 - srv0)
        checks.append(release_check("SQLite, warm-up and run", phase_jtis, srv1 - srv0, 2 * c))
        checks.append(release_check("SQLite, whole session", audit, srv1, 2 * c,
                                    noun="`token.release` allow audit entries"))
        ref1 = refreshes(http, [sq_base])
        checks.append((f"SQLite: {ref1 - ref0} upstream refreshes during the warm-up and run", ref1 == ref0))
        signer.close()
        signer = None
        sq.stop()
        servers.remove(sq)

        # ---------------------------------------------------------------- PostgreSQL
        pg.ensure_up()
        notes["pg"] = pg.settings()
        notes["pg_fs"] = fs_of(Path(notes["pg"]["data_directory"]))
        db_name = f"latchkey_bench_{stamp.replace('-', '_')}"
        db_url = pg.create(db_name)
        log(f"PostgreSQL {notes['pg']['server_version']}: fresh database {db_name} "
            f"(synchronous_commit={notes['pg']['synchronous_commit']}, fsync={notes['pg']['fsync']})")
        pg_dir = work / "pg"
        pg_dir.mkdir()
        n1 = Server(binary, pg_dir, work / "pg-node1.log", "demo", node_env(db_url, None, args.pool_size))
        servers.append(n1)
        n1.wait_ready()
        issuer = n1.issuer
        base1 = f"https://127.0.0.1:{n1.port}/"
        if issuer != base1:
            raise SystemExit(f"node 1 answers as {issuer}, expected {base1}")
        if (pg_dir / "latchkey.db").exists():
            raise SystemExit("node 1 wrote a SQLite database: LATCHKEY_DATABASE_URL was not used")
        ca = pg_dir / "tls" / "ca.pem"
        demo = json.loads((pg_dir / "demo.json").read_text())
        log(f"PostgreSQL node 1 up at {base1} (`latchkey demo`, issuer {issuer})")
        connect_demo_account(base1, ca, demo)
        agent = register_agent(binary, pg_dir, work, env=node_env(db_url, issuer, args.pool_size))
        signer = Signer({**agent, "user_id": demo["user_id"], "aud": issuer}, args.sign_workers)
        http = https_session(ca)
        ptag = f"bench-{stamp}-pg"
        _, replay_ok, replay_status = check_exchange(http, base1, signer, ptag, "secret")
        checks.append((f"PostgreSQL: a replayed body is refused by the same node ({replay_status})", replay_ok))

        bases, pg_nodes = [base1], [n1]
        ref_pg0 = refreshes(http, bases)
        for n in range(1, args.nodes + 1):
            if n > 1:
                node = Server(binary, pg_dir, work / f"pg-node{n}.log", "serve", node_env(db_url, issuer, args.pool_size))
                servers.append(node)
                node.wait_ready()
                if node.issuer != issuer:
                    raise SystemExit(f"node {n} answers as {node.issuer}, expected {issuer}")
                nb = f"https://127.0.0.1:{node.port}/"
                log(f"PostgreSQL node {n} up at {nb} (`latchkey serve`, issuer {node.issuer})")
                cross = check_new_node(http, base1, nb, signer, f"{ptag}-join{n}")
                checks.append((f"PostgreSQL: node {n} releases, and refuses a body node 1 released ({cross['status']})",
                               True))
                bases.append(nb)
                pg_nodes.append(node)
            ref_a = refreshes(http, bases)
            s0 = cluster_200s(http, bases)
            k0 = cancelled_after_commit(work)
            ph = f"{ptag}-n{n}"
            key = f"pg{n}"
            rows[key] = measure(signer, f"PostgreSQL, {n} node{'s' if n > 1 else ''}", pg_nodes, args, ph, work, pg)
            s1 = cluster_200s(http, bases)
            k = cancelled_after_commit(work) - k0
            used = int(pg.psql(f"SELECT count(*) FROM used_jtis WHERE position(':{ph}-' in key) > 0"))
            rows[key]["srv_200"], rows[key]["jtis"] = s1 - s0, used
            rows[key]["cancelled"] = used - (s1 - s0)
            checks.append(release_check(f"PostgreSQL, {n} node(s), warm-up and run", used, s1 - s0, 2 * c, k))
            ref_b = refreshes(http, bases)
            checks.append((f"PostgreSQL, {n} node(s): {ref_b - ref_a} upstream refreshes during the warm-up and run",
                           ref_b == ref_a))

        rows["healthz_end"] = run_wrk(base1 + "healthz", t, c, d, ["get"], "healthz-end", work, n1.proc.pid)
        log(f"healthz at the end (PostgreSQL node 1): {rows['healthz_end']['rps']:.0f} req/s")

        total = cluster_200s(http, bases)
        audit = int(pg.psql("SELECT count(*) FROM audit_events WHERE action = 'token.release' AND decision = 'allow'"))
        per_node = [token_200s(http, b) for b in bases]
        k_all = cancelled_after_commit(work)
        notes["cancelled"] = k_all
        checks.append(release_check(f"PostgreSQL, whole session over the nodes ({' + '.join(map(str, per_node))} "
                                    f"200s)", audit, total, 2 * c * args.nodes, k_all,
                                    noun="`token.release` allow audit entries"))
        notes["pg_refreshes"] = refreshes(http, bases) - ref_pg0
        for key, r in rows.items():
            if key.startswith("healthz"):
                ok = r["non200"] == 0 and not any(r[k] for k in ("err_connect", "err_read", "err_write", "err_timeout"))
            else:
                ok = r["non200"] == 0 and r["socket_errors"] == 0 and not r["exhausted"]
            label = "GET /healthz" + (" (end)" if key == "healthz_end" else "") if key.startswith("healthz") else r["label"]
            checks.append((f"{label}: {r['non200']} non-2xx, socket errors "
                           f"{r['err_connect']}/{r['err_read']}/{r['err_write']}/{r['err_timeout']} "
                           f"(connect/read/write/timeout)", ok))
        failed = False
    finally:
        if signer:
            signer.close()
        for s in reversed(servers):
            try:
                s.stop()
            except Exception as e:  # noqa: BLE001 - keep stopping the others
                log(f"stopping a node: {e}")
        try:
            pg.drop()
        except BaseException as e:  # noqa: BLE001 - report, do not hide the original error
            log(f"could not drop the database {pg.db}: {e}")
        findings = {}
        for logf in sorted(work.glob("*.log")):
            findings[logf.stem] = log_findings(logf)
        if failed:
            for name, fs in findings.items():
                for f in fs[:3]:
                    log(f"{name} log: {f}")
            log(f"failed; kept {work} (node logs, wrk-*.txt) for diagnosis")

    report = {"started": started, "info": machine_info(), "rows": rows, "checks": checks, "notes": notes,
              "threads": t, "conns": c, "duration": d, "warmup": args.warmup, "nodes": args.nodes,
              "pool": args.pool_size or 10, "findings": findings,
              "binary": f"{binary} (built {dt.datetime.fromtimestamp(binary.stat().st_mtime, dt.timezone.utc):%Y-%m-%d %H:%M UTC})"}
    print()
    print(table(report))
    md = markdown(report)
    if args.no_append:
        print()
        print(md)
    else:
        with open(args.results, "a") as f:
            f.write("\n" + md)
        log(f"appended results to {args.results}")
    all_ok = all(ok for _, ok in checks)
    if args.keep or not all_ok:
        log(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all_ok else 1


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def exchange_keys(r: dict) -> list[str]:
    return ["sqlite"] + [f"pg{n}" for n in range(1, r["nodes"] + 1) if f"pg{n}" in r["rows"]]


def pct(x: float) -> str:
    return f"{x * 100:.1f} %"


def cpu_per(x: dict) -> str:
    if not x["ok_rps"]:
        return "—"
    lk = x["server_cores"] / x["ok_rps"] * 1e6
    if x.get("pg_cores") is None:
        return f"{lk:.0f} µs"
    return f"{lk:.0f} + {x['pg_cores'] / x['ok_rps'] * 1e6:.0f} µs"


def waits_text(x: dict, top: int = 4) -> str:
    w = x.get("pg_waits", {})
    act = {k[4:]: v for k, v in w.items() if k.startswith("act:")}
    locks = {k[5:]: v for k, v in w.items() if k.startswith("lock:")}
    busy = {k: v for k, v in act.items() if k != "idle"}
    if not busy:
        return "—"
    parts = [f"{v:.1f} {k}" for k, v in sorted(busy.items(), key=lambda kv: -kv[1])[:top]]
    text = f"{sum(busy.values()):.1f} busy of {sum(act.values()):.1f} connections: " + ", ".join(parts)
    if locks:
        text += "; advisory lock waited for: " + ", ".join(
            f"{k} {v:.1f}" for k, v in sorted(locks.items(), key=lambda kv: -kv[1]))
    return text


def table(r: dict) -> str:
    rows, hz = r["rows"], r["rows"].get("healthz")
    sq = rows.get("sqlite")
    head = ("run", "nodes", "req/s", "p50", "p99", "non-2xx", "Latchkey CPU", "PG CPU", "CPU/exchange (LK+PG)",
            "machine busy", "÷ SQLite", "÷ healthz")
    out = [head]
    if hz:
        out.append(("GET /healthz", "1", f"{hz['rps']:.0f}", ms(hz["p50_us"]), ms(hz["p99_us"]), str(hz["non200"]),
                    f"{hz['server_cores']:.2f}", "—", "—", f"{hz['machine_busy'] * 100:.0f} %", "—", "100 %"))
    for k in exchange_keys(r):
        x = rows[k]
        out.append((("SQLite" if k == "sqlite" else "PostgreSQL") + " exchange", str(x["nodes"]), f"{x['ok_rps']:.0f}",
                    ms(x["p50_us"]), ms(x["p99_us"]), str(x["non200"]), f"{x['server_cores']:.2f}",
                    f"{x['pg_cores']:.2f}" if x.get("pg_cores") is not None else "—", cpu_per(x),
                    f"{x['machine_busy'] * 100:.0f} %", pct(x["ok_rps"] / sq["ok_rps"]) if sq and sq["ok_rps"] else "—",
                    pct(x["ok_rps"] / hz["rps"]) if hz else "—"))
    he = rows.get("healthz_end")
    if he:
        out.append(("GET /healthz (end, PG node 1)", "1", f"{he['rps']:.0f}", ms(he["p50_us"]), ms(he["p99_us"]),
                    str(he["non200"]), f"{he['server_cores']:.2f}", "—", "—", f"{he['machine_busy'] * 100:.0f} %",
                    "—", pct(he["rps"] / hz["rps"]) if hz else "—"))
    w = [max(len(row[i]) for row in out) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w[i]) if i else cell.ljust(w[i]) for i, cell in enumerate(row)) for row in out]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("p50/p99 of a multi-node run: the worst node's; req/s: the nodes' 200s summed")
    lines.append(f"background CPU before the runs: {r['notes'].get('background', 0) * 100:.0f} %")
    for k in exchange_keys(r):
        x = rows[k]
        if x["nodes"] > 1:
            lines.append(f"{x['label']}: " + "; ".join(
                f"node {i + 1} {p['ok_rps']:.0f}/s p99 {ms(p['p99_us'])} ({x['conns'][i]} conns)"
                for i, p in enumerate(x["parts"])))
        if x.get("pg_waits"):
            lines.append(f"{x['label']}: PostgreSQL backends of the run's database (mean of {x['pg_samples']} "
                         f"samples): {waits_text(x)}")
    for text, ok in r["checks"]:
        lines.append(f"{'ok  ' if ok else 'FAIL'} {text.replace('`', '')}")
    return "\n".join(lines)


def markdown(r: dict) -> str:
    rows, i, notes = r["rows"], r["info"], r["notes"]
    hz, sq, he = rows.get("healthz"), rows.get("sqlite"), rows.get("healthz_end")
    pgs = notes.get("pg", {})
    when = r["started"].strftime("%Y-%m-%d %H:%M UTC")

    def row(label: str, nodes: int, x: dict, rate: float, sq_ratio: str, hz_ratio: str, exch: bool) -> str:
        pgc = f"{x['pg_cores']:.2f} cores" if x.get("pg_cores") is not None else "—"
        return (f"| {label} | {nodes} | {rate:.0f} | {ms(x['p50_us'])} | {ms(x['p99_us'])} | {ms(x['p999_us'])} | "
                f"{x['non200']} | {x['server_cores']:.2f} cores | {pgc} | {cpu_per(x) if exch else '—'} | "
                f"{x['machine_busy'] * 100:.0f} % | {sq_ratio} | {hz_ratio} |")

    out = [
        f"## {when} — SQLite vs. PostgreSQL with 1–{r['nodes']} nodes — commit {i['commit']}",
        "",
        "- Harness: `bench/nodes.py` (`bash bench/run.sh nodes`)",
        f"- Binary: `{r['binary']}` (release profile); commit is HEAD at run time, the working tree may differ",
        f"- Machine: {i['nproc']} cores, CPU `{i['cpu']}`; wrk, every node and PostgreSQL on the same machine",
        f"- Background CPU in the 2 s before the runs: {notes.get('background', 0) * 100:.0f} % of all cores "
        f"(1-min loadavg {notes.get('loadavg', '?')})"
        + (" — **machine not idle, numbers are pessimistic**" if notes.get("background", 0) > 0.10 else ""),
        f"- SQLite: data dir on {notes.get('sqlite_fs', '?')} (WAL, `synchronous=FULL`)",
        f"- PostgreSQL {pgs.get('server_version', '?')} on 127.0.0.1:5432, data on {notes.get('pg_fs', '?')}, "
        f"`synchronous_commit={pgs.get('synchronous_commit', '?')}`, `fsync={pgs.get('fsync', '?')}`, "
        f"`wal_sync_method={pgs.get('wal_sync_method', '?')}`, `shared_buffers={pgs.get('shared_buffers', '?')}`; "
        f"a fresh database for the run, dropped at the end; `database_pool_size` {r['pool']} per node",
        f"- Nodes: node 1 `latchkey demo`, nodes 2–{r['nodes']} `latchkey serve`, one data dir (key file, "
        f"certificates), one database, `LATCHKEY_PUBLIC_URL` = node 1's issuer; each on its own port",
        f"- Load: `{i['wrk']}`, {r['conns']} connections in all, split over the nodes, one wrk per node at the same "
        f"time (`-t{r['threads']}` on one node, `-t1` each on several), `-d{r['duration']}s --latency` after a "
        f"{r['warmup']} s warm-up; one distinct pre-signed body per request, each wrk with its own",
        f"- Exchange: RS256 subject JWT, `client_secret_post`, cached upstream token (`demo-git`; demo tokens live "
        f"{DEMO_TOKEN_TTL} s, so no refresh falls in the run)",
        "",
        "| run | nodes | exchanges/s | p50 | p99 | p99.9 | non-2xx | Latchkey CPU | PostgreSQL CPU | CPU an exchange "
        "(Latchkey + PostgreSQL) | machine busy | ÷ SQLite | ÷ healthz |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    if hz:
        out.append(row("`GET /healthz` (SQLite node)", 1, hz, hz["rps"], "—", "100 %", False))
    for k in exchange_keys(r):
        x = rows[k]
        out.append(row("SQLite" if k == "sqlite" else "PostgreSQL", x["nodes"], x, x["ok_rps"],
                       pct(x["ok_rps"] / sq["ok_rps"]) if sq and sq["ok_rps"] else "—",
                       pct(x["ok_rps"] / hz["rps"]) if hz else "—", True))
    if he:
        out.append(row("`GET /healthz` (end, PostgreSQL node 1)", 1, he, he["rps"], "—",
                       pct(he["rps"] / hz["rps"]) if hz else "—", False))
    out += [
        "",
        "- Exchanges/s: the nodes' 200s summed; p50/p99/p99.9 of a run on several nodes: **the worst node's**. "
        "CPU: CPU seconds per wall second of the run (2.00 = both cores); PostgreSQL = this database's backends "
        "and the server's background processes. Machine busy: all processes, iowait as idle",
    ]
    for k in exchange_keys(r):
        x = rows[k]
        per = ""
        if x["nodes"] > 1:
            per = " Per node: " + "; ".join(
                f"{p['ok_rps']:.0f}/s, p50 {ms(p['p50_us'])}, p99 {ms(p['p99_us'])}, {p['server_cores']:.2f} cores "
                f"({x['conns'][j]} connections)" for j, p in enumerate(x["parts"])) + "."
        waits = ""
        if x.get("pg_waits"):
            waits = (f" PostgreSQL backends of the run's database, mean of {x['pg_samples']} samples of "
                     f"`pg_stat_activity`: {waits_text(x, 5)}.")
        out.append(f"- {x['label']}: {x['bodies']} bodies signed in {x['sign_s']:.1f} s (warm-up "
                   f"{x['warm_rps']:.0f}/s){' — **capped by the 60 s iat limit**' if x['capped'] else ''}"
                   f"{' — **bodies ran out: rate is a lower bound**' if x['exhausted'] else ''}.{per}{waits}")
    out.append(f"- Upstream refreshes on PostgreSQL over the whole session: {notes.get('pg_refreshes', '?')} "
               f"(the first exchange narrows the token to the grant's scopes; none during the runs)")
    unanswered = {rows[k]["label"]: rows[k].get("cancelled", 0) for k in exchange_keys(r)}
    out.append("- Releases committed but never answered: " + ", ".join(f"{k} {v}" for k, v in unanswered.items())
               + ". When wrk stops it closes its connections with requests in flight, and a node may then drop "
               "their handlers; one dropped after its release was handed to the database (SQLite: the release "
               "writer; PostgreSQL: `COMMIT` sent) leaves the release committed (audit entry, `jti` consumed) "
               "but unanswered, so `/metrics` has no 200 for it. On PostgreSQL sqlx's ROLLBACK of the dropped "
               f"transaction then logs `{CANCELLED_AFTER_COMMIT}`, once per such release")
    out.append("- Checks:")
    for text, ok in r["checks"]:
        out.append(f"  - {'ok' if ok else '**FAIL**'}: {text}")
    found = [f"{name}: `{f}`" for name, fs in r["findings"].items() for f in fs[:3]]
    out.append("- Node log warnings/errors: " + ("; ".join(found) if found else "none"))
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Latchkey at scale: the token exchange with 10³ … 10⁶ connected accounts in the vault.

For each size N (default 1000, 10000, 100000, 1000000), in one run and with the same settings:

 1. A fresh data dir: `latchkey demo` starts once (it creates the demo connection, user and
    keys), an agent `bench-agent` (RSA-2048 key, client secret) is registered and granted
    `read:user repo:read` on `demo-git`, and the server stops.
 2. `latchkey bench seed-accounts` writes N users, each with one active `demo-git` account whose
    access token is sealed for its own row and valid for 30 days — straight into SQLite, not
    through the API (timed and reported).
 3. `latchkey demo` starts again on the seeded database: start-up time (process start to its
    "listening" line, and to the first 200 on /healthz), RSS once idle.
 4. One checked exchange, a warm-up, then the measured exchange run: client_secret_post, RS256
    subject JWTs, each for a user picked by a hash of its `jti` among the N (so every request
    reads another account, across the whole table); the upstream token is cached, nothing is
    refreshed. Then RSS after the load and the peak (VmHWM).
 5. The server stops and the data dir is deleted before the next size.

It prints a table (p50/p99, p99 ÷ p99 at the smallest size, RSS, start-up) and appends a
Markdown section to bench/results.md. Traffic goes to 127.0.0.1 only; every step is bounded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exchange import (  # noqa: E402
    BENCH_DIR,
    CONNECTION,
    REPO_DIR,
    SCOPES,
    Server,
    Signer,
    check_exchange,
    fs_of,
    https_session,
    log,
    machine_cpu,
    machine_info,
    measure_exchange,
    register_agent,
)

RSS_TARGET_MIB = 150
P99_RATIO_TARGET = 1.3


def proc_mem_kib(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0])
    return out


def start(binary: Path, data_dir: Path, log_path: Path) -> tuple[Server, float, float]:
    """Start `latchkey demo`; (server, seconds to the listening line, seconds to the first /healthz 200)."""
    t0 = time.monotonic()
    server = Server(binary, data_dir, log_path)
    server.wait_ready(timeout=600)
    listening = time.monotonic() - t0
    http = https_session(data_dir / "tls" / "ca.pem")
    deadline = time.monotonic() + 120
    while True:
        try:
            if http.get(f"https://127.0.0.1:{server.port}/healthz", timeout=5).status_code == 200:
                break
        except Exception:  # noqa: BLE001 - retried until the deadline
            pass
        if time.monotonic() > deadline:
            raise SystemExit("server never answered /healthz")
        time.sleep(0.05)
    return server, listening, time.monotonic() - t0


def one_size(n: int, binary: Path, args, work_root: Path) -> dict:
    work = work_root / f"n{n}"
    data_dir = work / "data"
    data_dir.mkdir(parents=True)
    log(f"N = {n:,}: preparing {data_dir}")

    # 1. Demo seed, agent.
    server, first_start, _ = start(binary, data_dir, work / "server-setup.log")
    try:
        agent = register_agent(binary, data_dir, work)
    finally:
        server.stop()

    # 2. Bulk seeding.
    t0 = time.monotonic()
    out = subprocess.run(
        [str(binary), "bench", "seed-accounts", "--data-dir", str(data_dir), "--connection", CONNECTION,
         "--count", str(n), "--scopes", SCOPES],
        capture_output=True, text=True, timeout=args.seed_timeout,
    )
    seed_wall = time.monotonic() - t0
    if out.returncode != 0:
        raise SystemExit(f"seed-accounts failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    seeded = json.loads(out.stdout.strip().splitlines()[-1])
    db_bytes = sum(p.stat().st_size for p in data_dir.glob("latchkey.db*"))
    log(f"N = {n:,}: seeded {seeded['seeded']:,} accounts in {seeded['seconds']:.1f} s; database {db_bytes / 2**20:.0f} MiB")

    # 3. Start on the seeded database.
    server, listening_s, healthz_s = start(binary, data_dir, work / "server.log")
    signer = None
    try:
        time.sleep(1)  # let start-up work settle before reading RSS
        rss_idle = proc_mem_kib(server.proc.pid)
        base = f"https://127.0.0.1:{server.port}/"
        aud = server.issuer or base
        log(f"N = {n:,}: listening after {listening_s:.2f} s, /healthz 200 after {healthz_s:.2f} s, "
            f"RSS {rss_idle['VmRSS'] / 1024:.0f} MiB")
        signer = Signer({**agent, "user_id": "usr_bench_0", "aud": aud, "user_count": n}, args.sign_workers)
        tag = f"scale-{n}-{int(time.time())}"
        http = https_session(data_dir / "tls" / "ca.pem")
        check_exchange(http, base, signer, tag, "secret", label=f"n{n}")

        busy0, total0 = machine_cpu()
        time.sleep(1)
        busy1, total1 = machine_cpu()
        background = (busy1 - busy0) / max(1, total1 - total0)

        # 4. The measured run.
        ex = measure_exchange(signer, "secret", base, args, tag, work, server.proc.pid, None, label=f"n{n}")
        rss_after = proc_mem_kib(server.proc.pid)
    finally:
        if signer:
            signer.close()
        server.stop()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "n": n, "seed_s": seeded["seconds"], "seed_wall_s": seed_wall, "db_mib": db_bytes / 2**20,
        "first_start_s": first_start, "listening_s": listening_s, "healthz_s": healthz_s,
        "rss_idle_mib": rss_idle["VmRSS"] / 1024, "rss_after_mib": rss_after["VmRSS"] / 1024,
        "rss_peak_mib": rss_after["VmHWM"] / 1024, "rps": ex["ok_rps"], "p50_ms": ex["p50_us"] / 1000,
        "p99_ms": ex["p99_us"] / 1000, "p999_ms": ex["p999_us"] / 1000, "non200": ex["non200"],
        "exhausted": ex["exhausted"], "server_cores": ex["server_cores"], "background": background,
    }


def table(rows: list[dict]) -> list[str]:
    base = rows[0]["p99_ms"] if rows else None
    hdr = ("accounts", "seed", "start-up", "exchange/s", "p50", "p99", "p99 ÷ first", "RSS idle", "RSS peak", "non-2xx")
    body = [(f"{r['n']:,}", f"{r['seed_s']:.1f} s", f"{r['healthz_s']:.2f} s", f"{r['rps']:,.0f}",
             f"{r['p50_ms']:.2f} ms", f"{r['p99_ms']:.2f} ms", f"{r['p99_ms'] / base:.2f}",
             f"{r['rss_idle_mib']:.0f} MiB", f"{r['rss_peak_mib']:.0f} MiB", str(r["non200"])) for r in rows]
    return [hdr, *body]


def verdicts(rows: list[dict]) -> list[str]:
    if len(rows) < 2:
        return []
    first, last = rows[0], rows[-1]
    ratio = last["p99_ms"] / first["p99_ms"]
    out = [f"p99 at {last['n']:,} ÷ p99 at {first['n']:,} ≤ {P99_RATIO_TARGET} → {ratio:.2f} "
           f"({'meets' if ratio <= P99_RATIO_TARGET else 'below target'})",
           f"RSS at {last['n']:,} accounts ≤ {RSS_TARGET_MIB} MiB → peak {last['rss_peak_mib']:.0f} MiB "
           f"({'meets' if last['rss_peak_mib'] <= RSS_TARGET_MIB else 'below target'})",
           "start-up: " + ", ".join(f"{r['n']:,} → {r['healthz_s']:.2f} s" for r in rows)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(REPO_DIR / "target" / "release" / "latchkey"))
    ap.add_argument("--sizes", default="1000,10000,100000,1000000", help="comma-separated account counts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--duration", type=int, default=10, help="seconds per measured run (default 10)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sign-workers", type=int, default=2)
    ap.add_argument("--seed-timeout", type=int, default=900, help="seconds allowed for seeding one size")
    ap.add_argument("--results", default=str(BENCH_DIR / "results.md"))
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--json", default=None, help="also write the figures as JSON to this file (bench/run)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--tmp-root", default=None, help="parent of the temporary data dirs (default: system temp dir)")
    args = ap.parse_args()
    binary = Path(args.bin).resolve()
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]

    started = dt.datetime.now(dt.timezone.utc)
    work = Path(tempfile.mkdtemp(prefix="latchkey-scale-", dir=args.tmp_root))
    rows = []
    try:
        for n in sizes:
            rows.append(one_size(n, binary, args, work))
            r = rows[-1]
            log(f"N = {n:,}: {r['rps']:,.0f} exchanges/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                f"RSS peak {r['rss_peak_mib']:.0f} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    info = machine_info()
    t = table(rows)
    w = [max(len(row[i]) for row in t) for i in range(len(t[0]))]
    print()
    for k, row in enumerate(t):
        print("  ".join(c.rjust(w[i]) for i, c in enumerate(row)))
        if k == 0:
            print("-" * (sum(w) + 2 * (len(w) - 1)))
    for v in verdicts(rows):
        print(v)

    md = [f"## {started:%Y-%m-%d %H:%M UTC} — scale, commit {info['commit']}", "",
          f"- Machine: {info['nproc']} cores, `{info['cpu']}`; `{info['wrk']}` `-t{args.threads} -c{args.connections} "
          f"-d{args.duration}s`, exchange (RS256, client secret), each request for another of the N users; data on "
          f"{fs_of(work)}",
          "- Seed: `latchkey bench seed-accounts` (direct SQLite writes, one sealed token per account); start-up: "
          "process start to the first 200 on `/healthz`; RSS from `/proc/PID/status` (idle after start; peak = VmHWM "
          "after the run)", "",
          "| " + " | ".join(t[0]) + " | background |", "|" + " ---: |" * (len(t[0]) + 1)]
    md += ["| " + " | ".join(row) + f" | {r['background'] * 100:.0f} % |" for row, r in zip(t[1:], rows)]
    md += [""] + [f"- {v}" for v in verdicts(rows)] + [""]
    md = "\n".join(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"started": started.isoformat(), "rows": rows}, indent=1))
    if args.no_append:
        print()
        print(md)
    else:
        with open(args.results, "a") as f:
            f.write("\n" + md)
        log(f"appended results to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

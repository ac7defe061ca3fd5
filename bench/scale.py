#!/usr/bin/env python3
"""Latchkey at scale: the token exchange with 10³ … 10⁶ connected accounts in the vault.

For each size N (default 1000, 10000, 100000, 1000000):

 1. A fresh data dir: `latchkey demo` starts once (it creates the demo connection, user and
    keys), an agent `bench-agent` (RSA-2048 key, client secret) is registered and granted
    `read:user repo:read` on `demo-git`, and the server stops.
 2. `latchkey bench seed-accounts` writes N users, each with one active `demo-git` account whose
    access token is sealed for its own row and valid for 30 days — straight into SQLite, not
    through the API (timed and reported).
 3. `latchkey demo` starts again on the seeded database: start-up time (process start to the
    first 200 on /healthz), RSS once idle; one checked exchange.

Then all servers run side by side and the exchange is measured in interleaved rounds (each
round visits every size, the order rotating), so that other work on this shared machine does
not land on one size only; the median round is reported with the range. A run is a warm-up,
then the measured run: client_secret_post, RS256 subject JWTs, each for a user picked by a hash
of its `jti` among the N (every request reads another account, across the whole table); the
upstream token is cached, nothing is refreshed. RSS after the rounds and its peak (VmHWM).

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


class Size:
    """One size N: its data dir, seeded database and running server."""

    def __init__(self, n: int, binary: Path, args, work_root: Path):
        self.n = n
        self.work = work_root / f"n{n}"
        self.data_dir = self.work / "data"
        self.data_dir.mkdir(parents=True)
        self.server: Server | None = None
        self.signer: Signer | None = None
        self.runs: list[dict] = []
        self.runs1: list[dict] = []
        log(f"N = {n:,}: preparing {self.data_dir}")

        # 1. Demo seed, agent.
        server, _, _ = start(binary, self.data_dir, self.work / "server-setup.log")
        try:
            self.agent = register_agent(binary, self.data_dir, self.work)
        finally:
            server.stop()

        # 2. Bulk seeding.
        out = subprocess.run(
            [str(binary), "bench", "seed-accounts", "--data-dir", str(self.data_dir), "--connection", CONNECTION,
             "--count", str(n), "--scopes", SCOPES],
            capture_output=True, text=True, timeout=args.seed_timeout,
        )
        if out.returncode != 0:
            raise SystemExit(f"seed-accounts failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        self.seed_s = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
        self.db_mib = sum(p.stat().st_size for p in self.data_dir.glob("latchkey.db*")) / 2**20
        log(f"N = {n:,}: seeded {n:,} accounts in {self.seed_s:.1f} s; database {self.db_mib:.0f} MiB")

    def start(self, binary: Path, args) -> None:
        """3. Start on the seeded database; one checked exchange."""
        self.server, self.listening_s, self.healthz_s = start(binary, self.data_dir, self.work / "server.log")
        time.sleep(1)  # let start-up work settle before reading RSS
        self.rss_idle = proc_mem_kib(self.server.proc.pid)
        self.base = f"https://127.0.0.1:{self.server.port}/"
        log(f"N = {self.n:,}: listening after {self.listening_s:.2f} s, /healthz 200 after {self.healthz_s:.2f} s, "
            f"RSS {self.rss_idle['VmRSS'] / 1024:.0f} MiB")
        self.signer = Signer({**self.agent, "user_id": "usr_bench_0", "aud": self.server.issuer or self.base,
                              "user_count": self.n}, args.sign_workers)
        self.tag = f"scale-{self.n}-{int(time.time())}"
        check_exchange(https_session(self.data_dir / "tls" / "ca.pem"), self.base, self.signer, self.tag, "secret",
                       label=f"n{self.n}")

    def measure(self, args, round_no: int) -> dict:
        """4. One measured exchange run (with its warm-up and signing)."""
        assert self.server and self.signer
        busy0, total0 = machine_cpu()
        ex = measure_exchange(self.signer, "secret", self.base, args, self.tag, self.work, self.server.proc.pid,
                              None, label=f"n{self.n}-r{round_no}")
        busy1, total1 = machine_cpu()
        ex["machine"] = (busy1 - busy0) / max(1, total1 - total0)
        self.runs.append(ex)
        # The same on one connection: latency without queueing (with 32 connections in a closed
        # loop, p99 is mostly waiting behind the other requests and behind other work).
        one = argparse.Namespace(**{**vars(args), "threads": 1, "connections": 1, "duration": 3, "warmup": 1})
        self.runs1.append(measure_exchange(self.signer, "secret", self.base, one, self.tag, self.work,
                                           self.server.proc.pid, None, label=f"n{self.n}-r{round_no}-c1"))
        return ex

    def stop(self) -> None:
        if self.signer:
            self.signer.close()
            self.signer = None
        if self.server:
            self.server.stop()
            self.server = None

    def row(self) -> dict:
        rps = sorted(x["ok_rps"] for x in self.runs)
        p50 = sorted(x["p50_us"] / 1000 for x in self.runs)
        p99 = sorted(x["p99_us"] / 1000 for x in self.runs)
        mid = len(self.runs) // 2
        p50_1 = sorted(x["p50_us"] / 1000 for x in self.runs1)
        p99_1 = sorted(x["p99_us"] / 1000 for x in self.runs1)
        return {
            "n": self.n, "seed_s": self.seed_s, "db_mib": self.db_mib, "listening_s": self.listening_s,
            "healthz_s": self.healthz_s, "rss_idle_mib": self.rss_idle["VmRSS"] / 1024,
            "rss_after_mib": self.rss_after["VmRSS"] / 1024, "rss_peak_mib": self.rss_after["VmHWM"] / 1024,
            "rps": rps[mid], "p50_ms": p50[mid], "p99_ms": p99[mid], "p99_min_ms": p99[0], "p99_max_ms": p99[-1],
            "p99_all_ms": [x["p99_us"] / 1000 for x in self.runs], "rounds": len(self.runs),
            "p50_1c_ms": p50_1[mid], "p99_1c_ms": p99_1[mid], "p99_1c_min_ms": p99_1[0], "p99_1c_max_ms": p99_1[-1],
            "non200": sum(x["non200"] for x in self.runs + self.runs1),
            "exhausted": sum(x["exhausted"] for x in self.runs + self.runs1),
        }


def table(rows: list[dict]) -> list[tuple]:
    base = rows[0]["p99_ms"] if rows else None
    base1 = rows[0]["p99_1c_ms"] if rows else None
    hdr = ("accounts", "seed", "database", "start-up", "exchange/s", "p50", "p99", "p99 range", "p99 ÷ first",
           "1-conn p50", "1-conn p99", "1-conn p99 ÷ first", "RSS idle", "RSS peak", "non-2xx")
    body = [(f"{r['n']:,}", f"{r['seed_s']:.1f} s", f"{r['db_mib']:.0f} MiB", f"{r['healthz_s']:.2f} s",
             f"{r['rps']:,.0f}", f"{r['p50_ms']:.2f} ms", f"{r['p99_ms']:.2f} ms",
             f"{r['p99_min_ms']:.1f}–{r['p99_max_ms']:.1f} ms", f"{r['p99_ms'] / base:.2f}",
             f"{r['p50_1c_ms']:.2f} ms", f"{r['p99_1c_ms']:.2f} ms", f"{r['p99_1c_ms'] / base1:.2f}",
             f"{r['rss_idle_mib']:.0f} MiB", f"{r['rss_peak_mib']:.0f} MiB", str(r["non200"])) for r in rows]
    return [hdr, *body]


def verdicts(rows: list[dict]) -> list[str]:
    if len(rows) < 2:
        return []
    first, last = rows[0], rows[-1]
    ratio = last["p99_ms"] / first["p99_ms"]
    ratio1 = last["p99_1c_ms"] / first["p99_1c_ms"]
    out = [f"p99 at {last['n']:,} ÷ p99 at {first['n']:,} ≤ {P99_RATIO_TARGET} → {ratio:.2f} at 32 connections "
           f"({'meets' if ratio <= P99_RATIO_TARGET else 'below target'}), {ratio1:.2f} on one connection "
           f"({'meets' if ratio1 <= P99_RATIO_TARGET else 'below target'})",
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
    ap.add_argument("--duration", type=int, default=5, help="seconds per measured run (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all sizes (default 3)")
    ap.add_argument("--warmup", type=int, default=2)
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
    sizes_ = []
    background = None
    try:
        for n in sizes:
            sizes_.append(Size(n, binary, args, work))
        for sz in sizes_:
            sz.start(binary, args)
        busy0, total0 = machine_cpu()
        time.sleep(2)
        busy1, total1 = machine_cpu()
        background = (busy1 - busy0) / max(1, total1 - total0)
        log(f"background CPU before the runs: {background * 100:.0f} % of all cores")
        # Interleaved rounds (the order rotates each round), the median round reported: other
        # work on this shared machine comes and goes, and must not land on one size only.
        for k in range(args.rounds):
            order = sizes_[k % len(sizes_):] + sizes_[:k % len(sizes_)]
            for sz in order:
                ex = sz.measure(args, k)
                log(f"round {k + 1}/{args.rounds}, N = {sz.n:,}: {ex['ok_rps']:,.0f} exchanges/s, "
                    f"p50 {ex['p50_us'] / 1000:.2f} ms, p99 {ex['p99_us'] / 1000:.2f} ms")
        for sz in sizes_:
            sz.rss_after = proc_mem_kib(sz.server.proc.pid)
    finally:
        for sz in sizes_:
            sz.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    rows = [sz.row() for sz in sizes_]

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
    print(f"background CPU before the rounds: {background * 100:.0f} %; {args.rounds} rounds, median reported")

    md = [f"## {started:%Y-%m-%d %H:%M UTC} — scale, commit {info['commit']}", "",
          f"- Machine: {info['nproc']} cores, `{info['cpu']}`; `{info['wrk']}` `-t{args.threads} -c{args.connections} "
          f"-d{args.duration}s`, exchange (RS256, client secret), each request for another of the N users; data on "
          f"{fs_of(work)}",
          "- Seed: `latchkey bench seed-accounts` (direct SQLite writes, one sealed token per account); start-up: "
          "process start to the first 200 on `/healthz`; RSS from `/proc/PID/status` (idle after start; peak = VmHWM "
          "after the run)", "",
          f"- {args.rounds} interleaved rounds (the order rotates), median round reported; background CPU before "
          f"the rounds {background * 100:.0f} %", "",
          "| " + " | ".join(t[0]) + " |", "|" + " ---: |" * len(t[0])]
    md += ["| " + " | ".join(row) + " |" for row in t[1:]]
    md += [""] + [f"- {v}" for v in verdicts(rows)] + [""]
    md = "\n".join(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"started": started.isoformat(), "rows": rows,
                                               "background": background, "rounds": args.rounds}, indent=1))
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

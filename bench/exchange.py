#!/usr/bin/env python3
"""Latchkey load benchmark: privileged-worker token exchange vs. bare GET /healthz.

What it does (see bench/README.md for the why):

 1. Starts `latchkey demo` on 127.0.0.1 with a fresh temporary data directory.
 2. Connects the demo user's account to the built-in demo provider over HTTPS (login,
    consent, callback), so the vault holds a cached, fresh upstream access token.
 3. Registers an agent `bench-agent` with an RSA-2048 public key and a client secret, and
    grants it `read:user repo:read` on `demo-git`.
 4. Checks that one exchange succeeds (HTTP 200 with `access_token`) and that a replayed body
    is refused, for client_secret_post and (unless --skip-pkjwt) private_key_jwt.
 5. Runs wrk against `GET /healthz` (the bare HTTPS baseline).
 6. Warm-up exchange run to estimate the rate, then pre-signs ~1.5 x rate x duration distinct
    request bodies (one single-use `jti` each, signed in 2 processes right before the run)
    and runs wrk with the same thread/connection settings against `POST /oauth/token`
    (client_secret_post).
 7. The same again with private_key_jwt client authentication: each body also carries an RS256
    client assertion (own `jti`) signed by the agent key, so two signatures are verified per
    request (leave it out with --skip-pkjwt).
 8. Reads the audit events and used `jti`s from the database and compares them with the 200s.
 9. Prints a table and appends a dated Markdown section to bench/results.md.

All traffic goes to 127.0.0.1 only, every wrk run is bounded by -d, and the server is
stopped at the end.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib
from pathlib import Path

import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
LUA = BENCH_DIR / "wrk.lua"

GRANT_TYPE = "urn:auth0:params:oauth:grant-type:token-exchange:federated-connection-access-token"
SUBJECT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
REQUESTED_TOKEN_TYPE = "http://auth0.com/oauth/token-type/token-vault-access-token"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CONNECTION = "demo-git"
SCOPES = "read:user repo:read"

# Server-side limits the harness must respect (crates/core/src/vault.rs defaults).
SUBJECT_MAX_AGE = 60  # seconds: a subject JWT whose `iat` is older is refused
SAFETY = 12  # seconds kept free under SUBJECT_MAX_AGE (setup of wrk, clock granularity)
PEER_ASSERTION_TTL = 180  # seconds from `iat` to `exp` of the peer's client assertions (it has no `iat` limit)

TARGETS = {"rps": 20_000, "p99_ms": 10.0, "ratio": 0.25, "pkjwt_rps": 15_000}


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sh(cmd: list[str], **kw) -> str:
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, **kw)
    if out.returncode != 0:
        raise SystemExit(f"command failed ({out.returncode}): {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")
    return out.stdout


def machine_info() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=10
        )
        commit = commit.stdout.strip() if commit.returncode == 0 and commit.stdout.strip() else "uncommitted"
    except (OSError, subprocess.SubprocessError):
        commit = "uncommitted"
    try:
        wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10)
        wrk_version = (wrk_version.stdout + wrk_version.stderr).splitlines()[0].split(" [")[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        wrk_version = "unknown"
    return {"nproc": os.cpu_count(), "cpu": model, "commit": commit, "wrk": wrk_version}


def fs_of(path: Path) -> str:
    """`device fstype` of the mount holding `path` (where the SQLite WAL is fsynced)."""
    try:
        best = ("", "?", "?")
        real = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype, *_ = line.split()
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, dev, fstype)
        return f"{best[2]} on {best[1]} (mounted at {best[0]})"
    except OSError:
        return "unknown"


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


class Server:
    LISTEN_RE = re.compile(r"Latchkey is listening on 127\.0\.0\.1:(\d+) \(issuer (\S+)\)")

    def __init__(self, binary: Path, data_dir: Path, log_path: Path, command: str = "demo",
                 env: dict[str, str] | None = None):
        """`latchkey <command>` (`demo`, or `serve` for another node of a deployment whose first
        node seeded the demo) on a free port; `env` replaces the environment if given."""
        self.data_dir = data_dir
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen(
            [str(binary), command, "--data-dir", str(data_dir), "--listen", "127.0.0.1:0"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            text=True,
            start_new_session=True,
        )
        self.port: int | None = None
        self.issuer: str | None = None
        self.ready = threading.Event()
        self.stdout_lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # keeps reading until EOF so the server never blocks
            if len(self.stdout_lines) < 200:
                self.stdout_lines.append(line.rstrip("\n"))
            m = self.LISTEN_RE.search(line)
            if m and not self.ready.is_set():
                self.port, self.issuer = int(m.group(1)), m.group(2)
                self.ready.set()
        self.ready.set()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        if not self.ready.wait(timeout) or self.port is None:
            raise SystemExit(f"server did not report its address; stdout so far:\n" + "\n".join(self.stdout_lines))
        demo_json = self.data_dir / "demo.json"
        ca = self.data_dir / "tls" / "ca.pem"
        while not (demo_json.exists() and ca.exists()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("server did not write demo.json / tls/ca.pem")
            time.sleep(0.1)
        # demo.json is written after the line above; wait until it parses.
        while True:
            try:
                json.loads(demo_json.read_text())
                break
            except (ValueError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the server shuts down on Ctrl-C
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log_file.close()


# --------------------------------------------------------------------------------------------
# Setup: connect the demo account, register the agent
# --------------------------------------------------------------------------------------------


def hidden(html: str, name: str) -> str:
    m = re.search(r'<input[^>]*name="%s"[^>]*value="([^"]*)"' % re.escape(name), html)
    if not m:
        raise SystemExit(f"no hidden input `{name}` in page:\n{html[:1500]}")
    return m.group(1).replace("&amp;", "&")


def expect(resp: requests.Response, codes: tuple[int, ...], what: str) -> requests.Response:
    if resp.status_code not in codes:
        raise SystemExit(f"{what}: HTTP {resp.status_code} (expected {codes})\n{resp.text[:1500]}")
    return resp


def https_session(ca: Path) -> requests.Session:
    s = requests.Session()
    # Ignore REQUESTS_CA_BUNDLE / proxies from the environment: requests lets the environment's
    # CA bundle override Session.verify, and nothing here may go through a proxy.
    s.trust_env = False
    s.verify = str(ca)
    return s


def connect_demo_account(base: str, ca: Path, demo: dict) -> None:
    s = https_session(ca)
    nxt = f"/connect/{CONNECTION}"

    r = expect(s.get(base + "login", params={"next": nxt}, allow_redirects=False, timeout=10), (200,), "GET /login")
    csrf = hidden(r.text, "csrf")
    r = s.post(
        base + "login",
        data={"username": demo["username"], "password": demo["password"], "csrf": csrf, "next": nxt},
        allow_redirects=False, timeout=10,
    )
    expect(r, (303,), "POST /login")
    if "latchkey_session" not in s.cookies:
        raise SystemExit("POST /login did not set latchkey_session")

    r = expect(s.get(base + f"connect/{CONNECTION}", allow_redirects=False, timeout=10), (303,), "GET /connect")
    authorize = urllib.parse.urljoin(base, r.headers["Location"])
    if not authorize.startswith(base):
        raise SystemExit(f"unexpected authorize URL (must stay on 127.0.0.1): {authorize}")

    r = expect(s.get(authorize, allow_redirects=False, timeout=10), (200,), "GET demo authorize")
    consent = hidden(r.text, "consent")
    r = s.post(
        base + "demo/oauth/authorize", data={"consent": consent, "decision": "approve"}, allow_redirects=False, timeout=10
    )
    expect(r, (302, 303), "POST demo authorize")
    callback = urllib.parse.urljoin(base, r.headers["Location"])
    if not callback.startswith(base + f"connect/{CONNECTION}/callback"):
        raise SystemExit(f"unexpected callback URL: {callback}")

    r = expect(s.get(callback, allow_redirects=False, timeout=10), (303,), f"GET /connect/{CONNECTION}/callback")
    if f"connected={CONNECTION}" not in r.headers.get("Location", ""):
        raise SystemExit(f"callback redirected to {r.headers.get('Location')!r}, expected ...connected={CONNECTION}")


def register_agent(binary: Path, data_dir: Path, work: Path, env: dict[str, str] | None = None,
                   alg: str = "RS256", name: str = "bench-agent") -> dict:
    """Register an agent with a fresh key (`alg` RS256: RSA-2048; ES256: P-256) and a client
    secret, and grant it SCOPES on CONNECTION."""
    if alg == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    pub_path = work / f"{name}.pub.pem"
    pub_path.write_bytes(pub_pem)

    out = sh(
        [str(binary), "agent", "add", name, "--public-key", str(pub_path), "--secret", "--json",
         "--data-dir", str(data_dir)], env=env
    )
    agent = json.loads(out)
    if not agent.get("kids"):
        raise SystemExit(f"agent add returned no kids: {out}")
    sh([str(binary), "agent", "grant", agent["client_id"], "--connection", CONNECTION, "--scopes", SCOPES,
        "--data-dir", str(data_dir)], env=env)
    return {
        "client_id": agent["client_id"],
        "client_secret": agent["client_secret"],
        "kid": agent["kids"][0],
        "private_pem": priv_pem,
        "alg": alg,
    }


# --------------------------------------------------------------------------------------------
# Signing (multiprocessing)
# --------------------------------------------------------------------------------------------

_SIGNER: dict = {}


def _signer_init(ctx: dict) -> None:
    _SIGNER.clear()
    _SIGNER.update(ctx)
    _SIGNER["key"] = serialization.load_pem_private_key(ctx["private_pem"], password=None)
    alg = _SIGNER["alg"] = ctx.get("alg", "RS256")
    _SIGNER["header"] = b64url(
        json.dumps({"alg": alg, "typ": "token-vault-req+jwt", "kid": ctx["kid"]}, separators=(",", ":")).encode()
    )
    # Client assertion (private_key_jwt): same key, no `typ`.
    _SIGNER["assertion_header"] = b64url(json.dumps({"alg": alg, "kid": ctx["kid"]}, separators=(",", ":")).encode())
    # Everything but the subject token (and the client assertion) is the same for every request.
    _SIGNER["prefix"] = {
        "secret": urllib.parse.urlencode(
            {
                "grant_type": GRANT_TYPE,
                "client_id": ctx["client_id"],
                "client_secret": ctx.get("client_secret", ""),
                "subject_token_type": SUBJECT_TOKEN_TYPE,
                "requested_token_type": REQUESTED_TOKEN_TYPE,
                "connection": CONNECTION,
            }
        ),
        "pkjwt": urllib.parse.urlencode(
            {
                "grant_type": GRANT_TYPE,
                "client_id": ctx["client_id"],
                "client_assertion_type": CLIENT_ASSERTION_TYPE,
                "subject_token_type": SUBJECT_TOKEN_TYPE,
                "requested_token_type": REQUESTED_TOKEN_TYPE,
                "connection": CONNECTION,
            }
        ),
        # The peer (bench/peer/oidc_provider.mjs): a client_credentials grant, private_key_jwt.
        "peer": urllib.parse.urlencode(
            {
                "grant_type": "client_credentials",
                "client_id": ctx["client_id"],
                "client_assertion_type": CLIENT_ASSERTION_TYPE,
            }
        ),
    }


def _sign(header: str, claims: dict) -> str:
    signing_input = header + "." + b64url(json.dumps(claims, separators=(",", ":")).encode())
    if _SIGNER["alg"] == "ES256":
        # JWS wants the raw r ‖ s (32 bytes each), not the DER that `cryptography` returns.
        r, s = decode_dss_signature(_SIGNER["key"].sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        sig = _SIGNER["key"].sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + b64url(sig)


def _subject_jwt(jti: str) -> str:
    now = int(time.time())
    sub = _SIGNER["user_id"]
    if _SIGNER.get("user_count"):
        # Spread over the seeded users (bench/scale.py): usr_bench_0 … usr_bench_{N-1}.
        sub = f"usr_bench_{zlib.crc32(jti.encode()) % _SIGNER['user_count']}"
    claims = {
        "iss": _SIGNER["client_id"],
        "sub": sub,
        "aud": _SIGNER["aud"],
        "iat": now,
        "exp": now + 60,
        "jti": jti,
        "audit_context": "bench",
    }
    return _sign(_SIGNER["header"], claims)


def _client_assertion(jti: str) -> str:
    now = int(time.time())
    cid = _SIGNER["client_id"]
    ttl = _SIGNER.get("assertion_ttl", 60)
    claims = {"iss": cid, "sub": cid, "aud": _SIGNER["aud"], "iat": now, "exp": now + ttl, "jti": jti}
    return _sign(_SIGNER["assertion_header"], claims)


def _body(mode: str, jti: str) -> str:
    # JWTs are base64url + '.', all safe in a form body without escaping.
    prefix = _SIGNER["prefix"][mode]
    if mode == "pkjwt":
        return f"{prefix}&client_assertion={_client_assertion(jti + '-a')}&subject_token={_subject_jwt(jti)}"
    if mode == "peer":
        return f"{prefix}&client_assertion={_client_assertion(jti)}"
    return f"{prefix}&subject_token={_subject_jwt(jti)}"


def _sign_range(args: tuple[str, str, int, int]) -> list[str]:
    mode, tag, start, count = args
    return [_body(mode, f"{tag}-{i}") for i in range(start, start + count)]


class Signer:
    """Signs request bodies for `ctx`'s agent: batches in `workers` forked processes, single
    bodies and client assertions in this one (`workers=0`: no pool, single ones only)."""

    def __init__(self, ctx: dict, workers: int):
        self.pool = (mp.get_context("fork").Pool(workers, initializer=_signer_init, initargs=(ctx,))
                     if workers else None)
        self.workers = workers
        self.seq = 0
        self.ctx = ctx

    def _here(self) -> None:
        # Single bodies are signed in this process, whose signing state is one agent's at a
        # time: several Signers (one per agent key) take turns.
        if _SIGNER.get("_owner") != id(self):
            _signer_init(self.ctx)
            _SIGNER["_owner"] = id(self)

    def one(self, tag: str, mode: str = "secret") -> str:
        self._here()
        return _sign_range((mode, tag, 0, 1))[0]

    def assertion(self, jti: str) -> str:
        """A `private_key_jwt` client assertion alone (e.g. for `grant_type=client_credentials`)."""
        self._here()
        return _client_assertion(jti)

    def batch(self, tag: str, n: int, mode: str = "secret", budget: float | None = None) -> tuple[list[str], float]:
        """Up to `n` bodies; with `budget` (seconds), only as many as are signed within it."""
        if self.pool is None:
            raise RuntimeError("Signer(workers=0) signs single bodies only")
        t0 = time.monotonic()
        chunk = max(1, min(500 if budget else 2000, math.ceil(n / (self.workers * 8))))
        jobs = [(mode, tag, i, min(chunk, n - i)) for i in range(0, n, chunk)]
        bodies: list[str] = []
        for k in range(0, len(jobs), self.workers):
            if budget is not None and time.monotonic() - t0 > budget:
                break
            for part in self.pool.map(_sign_range, jobs[k:k + self.workers]):
                bodies.extend(part)
        return bodies, time.monotonic() - t0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


# --------------------------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    hz = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / hz, int(fields[12]) / hz


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine; iowait counts as idle."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


def run_wrk(url: str, threads: int, conns: int, duration: int, lua_args: list[str], label: str, out_dir: Path,
            server_pid: int) -> dict:
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--timeout", "5s", "--latency",
           "-s", str(LUA), url, "--", *lua_args]
    log(f"{label}: {' '.join(cmd)}")
    cpu0, (busy0, total0), t0 = proc_cpu_s(server_pid), machine_cpu(), time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    cpu1, (busy1, total1), t1 = proc_cpu_s(server_pid), machine_cpu(), time.monotonic()
    (out_dir / f"wrk-{label}.txt").write_text(out.stdout + "\n--- stderr ---\n" + out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    m = re.search(r"^WRKJSON (\{.*\})$", out.stdout, re.M)
    if not m:
        raise SystemExit(f"no WRKJSON line in wrk output:\n{out.stdout}\n{out.stderr}")
    res = json.loads(m.group(1))
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    res["ok"] = res["requests"] - res["non200"] if res["responses_seen"] else 0
    res["ok_rps"] = res["ok"] / (res["duration_us"] / 1e6)
    # CPU seconds per wall second used by the server (user, system).
    res["server_user"] = (cpu1[0] - cpu0[0]) / (t1 - t0)
    res["server_sys"] = (cpu1[1] - cpu0[1]) / (t1 - t0)
    res["server_cores"] = res["server_user"] + res["server_sys"]
    res["machine_busy"] = (busy1 - busy0) / max(1, total1 - total0)  # fraction of all cores busy
    res["stdout"] = out.stdout
    res["stderr"] = out.stderr
    if out.stderr.strip():
        for line in out.stderr.strip().splitlines()[:5]:
            log(f"{label} stderr: {line}")
    return res


def write_bodies(path: Path, bodies: list[str]) -> None:
    with open(path, "w") as f:
        f.write("\n".join(bodies))
        f.write("\n")


def measure_exchange(signer: Signer, mode: str, base: str, args, run_tag: str, work: Path, server_pid: int,
                     connected_at: float | None, label: str | None = None, url: str | None = None) -> dict:
    """Warm-up, sizing, signing right before, then the measured run for one client-auth mode.

    `mode` is "secret" (client_secret_post), "pkjwt" (private_key_jwt: two signatures per body,
    so the signing rate, and with it the cap, is measured for that body kind) or "peer" (a
    client_credentials grant with private_key_jwt, for the peer). `label` names the scenario
    (files, `jti`s, log); `url` is the token endpoint (default: Latchkey's)."""
    t, c, d = args.threads, args.connections, args.duration
    label = label or ("" if mode == "secret" else mode)
    sfx = f"-{label}" if label else ""
    name = f"exchange ({label})" if label else "exchange"
    url = url or base + "oauth/token"
    per_body = 2 if mode == "pkjwt" else 1  # signatures per body

    # Signing rate and warm-up exchange run to size the batch.
    probe, probe_s = signer.batch(f"{run_tag}{sfx}-probe", 2000 * args.sign_workers // per_body, mode)
    sign_rate = len(probe) / probe_s
    log(f"{name}: signing rate: {sign_rate:.0f} bodies/s ({per_body} signature{'s' if per_body > 1 else ''} "
        f"a body) with {args.sign_workers} processes")
    # Seconds we may spend signing the main batch: Latchkey refuses subject tokens and client
    # assertions whose `iat` is older than 60 s; the peer only checks `exp`, which its bodies
    # set PEER_ASSERTION_TTL after `iat`.
    max_age = PEER_ASSERTION_TTL if mode == "peer" else SUBJECT_MAX_AGE
    sign_budget = max_age - SAFETY - d
    max_bodies = int(sign_rate * sign_budget)

    warm_n = max(len(probe), min(max_bodies, int(sign_rate * 3)))
    extra, _ = signer.batch(f"{run_tag}{sfx}-warm", warm_n - len(probe), mode)
    warm_bodies = probe + extra
    warm_file = work / f"bodies-warmup{sfx}.txt"
    write_bodies(warm_file, warm_bodies)
    warm = run_wrk(url, t, c, args.warmup, ["post", str(warm_file), str(t)], f"warmup{sfx}", work,
                   server_pid)
    if warm["exhausted"]:
        # Lower bound only: the batch ran out. Size generously from it.
        est = warm["bodies_used"] / (warm["duration_us"] / 1e6)
        log(f"warm-up used all {len(warm_bodies)} bodies; rate is at least {est:.0f}/s")
        est *= 2
    else:
        est = warm["ok_rps"]
        log(f"warm-up: {warm['rps']:.0f} req/s ({warm['non200']} non-200), p99 {warm['p99_us'] / 1000:.2f} ms")
    del warm_bodies, probe, extra

    want = int(math.ceil(1.5 * est * d)) + 100 * c

    # The measured exchange run: sign right before (as many as fit in the signing budget: the
    # rate measured by the probe moves with the machine's other work), then load.
    bodies, sign_s = signer.batch(f"{run_tag}{sfx}-run", want, mode, budget=sign_budget)
    n = len(bodies)
    capped = n < want
    if capped:
        log(f"batch capped at {n} bodies (want {want}): signing must finish {SAFETY + d}s before the {max_age} s limit")
    main_file = work / f"bodies-run{sfx}.txt"
    write_bodies(main_file, bodies)
    del bodies
    log(f"signed {n} bodies in {sign_s:.1f}s; oldest body will be {sign_s + d:.0f}s old at the end of the run")
    if connected_at is not None and time.monotonic() - connected_at + d + 5 > 270:
        log("warning: upstream token may be refreshed during the run (demo tokens live 300 s)")
    ex = run_wrk(url, t, c, d, ["post", str(main_file), str(t)], f"exchange{sfx}", work, server_pid)
    log(f"{name}: {ex['ok_rps']:.0f} exchanges/s ({ex['non200']} non-200), p50 {ex['p50_us'] / 1000:.2f} ms, "
        f"p99 {ex['p99_us'] / 1000:.2f} ms")
    ex.update(sign_s=sign_s, bodies=n, warm=warm, sign_rate=sign_rate, capped=capped)
    return ex


def check_exchange(http: requests.Session, base: str, signer: Signer, run_tag: str, mode: str,
                   label: str | None = None, url: str | None = None) -> tuple[int, bool, str]:
    """One exchange checked in full, then one body sent twice (single-use `jti`).

    Returns (number of 200s given, replay refused?, replay status text)."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    label = label if label is not None else ("" if mode == "secret" else mode)
    sfx = f"-{label}" if label else ""
    what = f"check exchange ({label})" if label else "check exchange"
    url = url or base + "oauth/token"
    r = http.post(url, data=signer.one(f"{run_tag}-check{sfx}", mode), headers=form, timeout=10)
    if r.status_code != 200 or "access_token" not in r.json():
        raise SystemExit(f"{what} failed: HTTP {r.status_code}\n{r.text}")
    log(f"{what} OK: token_type={r.json().get('token_type')!r} expires_in={r.json().get('expires_in')}")

    body = signer.one(f"{run_tag}-replay{sfx}", mode)
    r1 = http.post(url, data=body, headers=form, timeout=10)
    r2 = http.post(url, data=body, headers=form, timeout=10)
    # client_secret_post: the subject `jti` is reused (400 invalid_grant). private_key_jwt: the
    # assertion's `jti` is checked first (401 invalid_client).
    ok = r1.status_code == 200 and r2.status_code in ((400,) if mode == "secret" else (400, 401))
    err = ""
    try:
        err = r2.json().get("error", "")
    except ValueError:
        pass
    log(f"replay check{f' ({label})' if label else ''}: first {r1.status_code}, replay "
        f"{r2.status_code} {err} ({'ok' if ok else 'UNEXPECTED'})")
    return 1 + (r1.status_code == 200), ok, f"{r2.status_code} {err}".strip()


def token_200s(http: requests.Session, base: str) -> int | None:
    """How many `POST /oauth/token` the server has answered 200, by its own count (`GET /metrics`).

    Unlike wrk's count, this includes requests still in flight when wrk stopped (the server
    finishes them, and releases the token, after the client has gone)."""
    try:
        r = http.get(base + "metrics", timeout=10)
    except requests.RequestException:
        return None
    if r.status_code != 200:
        return None
    n = None
    for labels, value in re.findall(r"^latchkey_http_requests_total\{([^}]*)\}\s+(\S+)", r.text, re.M):
        if 'method="POST"' in labels and 'route="/oauth/token"' in labels and 'status="200"' in labels:
            n = (n or 0) + int(float(value))
    return n or 0


def settled_token_200s(http: requests.Session, base: str) -> int | None:
    """`token_200s` once the requests left in flight by wrk have finished (stable for 0.3 s, at most 5 s)."""
    last = token_200s(http, base)
    deadline = time.monotonic() + 5
    while last is not None and time.monotonic() < deadline:
        time.sleep(0.3)
        now = token_200s(http, base)
        if now == last:
            break
        last = now
    return last


def db_counts(data_dir: Path, key_part: str) -> tuple[int, int, int]:
    """(`token.release` allow audit events, used `jti`s, used `jti`s whose key contains `key_part`),
    read-only from the server's database."""
    import sqlite3

    db = sqlite3.connect(f"file:{data_dir / 'latchkey.db'}?mode=ro", uri=True, timeout=10)
    try:
        audit = db.execute(
            "SELECT COUNT(*) FROM audit_events WHERE action='token.release' AND decision='allow'"
        ).fetchone()[0]
        jtis = db.execute("SELECT COUNT(*) FROM used_jtis").fetchone()[0]
        part = db.execute("SELECT COUNT(*) FROM used_jtis WHERE instr(key, ?) > 0", (key_part,)).fetchone()[0]
    finally:
        db.close()
    return audit, jtis, part


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# The peer: oidc-provider (npm), client_credentials with private_key_jwt
# --------------------------------------------------------------------------------------------

PEER_DIR = BENCH_DIR / "peer"
PEER_SCRIPT = PEER_DIR / "oidc_provider.mjs"
PEER_CLIENT = "bench-peer"


def rsa_public_jwk(private_pem: bytes, kid: str) -> dict:
    key = serialization.load_pem_private_key(private_pem, password=None)
    n = key.public_key().public_numbers()
    return {"kty": "RSA", "n": b64url(n.n.to_bytes((n.n.bit_length() + 7) // 8, "big")),
            "e": b64url(n.e.to_bytes((n.e.bit_length() + 7) // 8, "big")), "kid": kid, "alg": "RS256", "use": "sig"}


class Peer:
    """bench/peer/oidc_provider.mjs on 127.0.0.1 (HTTPS, port 0, the Latchkey server's certificate);
    stops when its stdin closes."""

    def __init__(self, node: str, tls_dir: Path, work: Path, jwk: dict):
        clients = work / "peer-clients.json"
        clients.write_text(json.dumps([{"client_id": PEER_CLIENT, "jwks": {"keys": [jwk]}}]))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NODE_ENV": "production",
               "TLS_CERT": str(tls_dir / "server.pem"), "TLS_KEY": str(tls_dir / "server-key.pem"),
               "CLIENTS": str(clients)}
        self.log_file = open(work / "peer.log", "w")
        self.proc = subprocess.Popen([node, str(PEER_SCRIPT)], cwd=PEER_DIR, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log_file, text=True, start_new_session=True)
        ready = threading.Event()
        self.issuer: str | None = None

        def drain() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if self.issuer is None and line.startswith("https://127.0.0.1:"):
                    self.issuer = line.strip()
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(30) or self.issuer is None:
            self.stop()
            raise SystemExit(f"the peer did not start; see {work / 'peer.log'}")
        self.token_url = self.issuer + "/token"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log_file.close()


def verify_cost(binary: Path) -> dict | None:
    """`latchkey bench verify-cost`: µs per RS256 / ES256 verification on one thread."""
    try:
        out = subprocess.run([str(binary), "bench", "verify-cost"], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            log(f"verify-cost failed: {out.stderr.strip()[:300]}")
            return None
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        log(f"verify-cost failed: {e}")
        return None


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

# Latchkey's scenarios: (key, mode, signing key, table label). The peer is measured after them.
SCENARIOS = [
    ("secret", "secret", "RS256", "exchange, RS256 subject JWT, client secret"),
    ("pkjwt", "pkjwt", "RS256", "exchange, RS256, `private_key_jwt` (2 verifications)"),
    ("es256-secret", "secret", "ES256", "exchange, ES256 subject JWT, client secret"),
    ("es256-pkjwt", "pkjwt", "ES256", "exchange, ES256, `private_key_jwt` (2 verifications)"),
]
PEER_LABEL = "peer: `oidc-provider` client_credentials, RS256 `private_key_jwt`"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(REPO_DIR / "target" / "release" / "latchkey"))
    ap.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    ap.add_argument("--duration", type=int, default=10, help="seconds per measured run (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="seconds of the warm-up exchange run (default 3)")
    ap.add_argument("--sign-workers", type=int, default=2)
    ap.add_argument("--results", default=str(BENCH_DIR / "results.md"), help="Markdown file to append to")
    ap.add_argument("--no-append", action="store_true", help="print the Markdown section only")
    ap.add_argument("--json", default=None, help="also write the figures as JSON to this file (bench/run)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--tmp-root", default=None,
                    help="parent of the temporary data dir (default: the system temp dir). Diagnostic only: "
                         "a tmpfs such as /dev/shm makes fsync free, so the run is no longer durable")
    ap.add_argument("--skip-pkjwt", action="store_true",
                    help="leave out the exchanges with private_key_jwt client authentication")
    ap.add_argument("--skip-es256", action="store_true", help="leave out the exchanges with an ES256 agent key")
    ap.add_argument("--skip-peer", action="store_true", help="leave out the oidc-provider peer")
    ap.add_argument("--node", default=shutil.which("node") or "node", help="node binary for the peer")
    args = ap.parse_args()

    binary = Path(args.bin).resolve()
    if not binary.exists():
        raise SystemExit(f"{binary} not found: cargo build --release -p latchkey-cli")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    if args.duration + SAFETY >= SUBJECT_MAX_AGE:
        raise SystemExit(f"--duration must be below {SUBJECT_MAX_AGE - SAFETY}s (subject tokens expire at 60 s)")
    if not args.skip_peer and not (PEER_DIR / "node_modules" / "oidc-provider").exists():
        raise SystemExit("the peer needs `npm ci` in bench/peer (bash bench/run.sh does it), or pass --skip-peer")
    scenarios = [sc for sc in SCENARIOS
                 if not (args.skip_pkjwt and sc[1] == "pkjwt") and not (args.skip_es256 and sc[2] == "ES256")]

    started = dt.datetime.now(dt.timezone.utc)
    work = Path(tempfile.mkdtemp(prefix="latchkey-bench-", dir=args.tmp_root))
    data_dir = work / "data"
    data_dir.mkdir()
    server = Server(binary, data_dir, work / "server.log")
    signers: dict[str, Signer] = {}
    peer = None
    results: dict[str, dict] = {}
    checks: dict[str, tuple] = {}
    jti_counts: dict[str, int] = {}
    srv_200: dict[str, int | None] = {}
    try:
        server.wait_ready()
        base = f"https://127.0.0.1:{server.port}/"
        if server.issuer != base:
            log(f"note: server issuer is {server.issuer}, using it as `aud`")
        aud = server.issuer or base
        ca = data_dir / "tls" / "ca.pem"
        demo = json.loads((data_dir / "demo.json").read_text())
        log(f"server up at {base} (data dir {data_dir}, {fs_of(data_dir)})")

        connect_demo_account(base, ca, demo)
        connected_at = time.monotonic()
        log("demo account connected (upstream token cached)")

        agents = {}
        for alg in sorted({sc[2] for sc in scenarios}):
            name = "bench-agent" if alg == "RS256" else f"bench-agent-{alg.lower()}"
            agents[alg] = register_agent(binary, data_dir, work, alg=alg, name=name)
            log(f"agent {agents[alg]['client_id']} ({alg}) registered (kid {agents[alg]['kid']}), "
                f"granted {SCOPES!r} on {CONNECTION}")
            signers[alg] = Signer({**agents[alg], "user_id": demo["user_id"], "aud": aud}, args.sign_workers)
        run_tag = f"bench-{os.getpid()}-{int(time.time())}"
        http = https_session(ca)

        # The peer, on the same certificate; its one client has the RS256 agent's public key.
        if not args.skip_peer:
            rs = agents.get("RS256") or register_agent(binary, data_dir, work, alg="RS256")
            peer = Peer(args.node, data_dir / "tls", work, rsa_public_jwk(rs["private_pem"], rs["kid"]))
            signers["peer"] = Signer({"client_id": PEER_CLIENT, "kid": rs["kid"], "private_pem": rs["private_pem"],
                                      "alg": "RS256", "user_id": "", "aud": peer.issuer,
                                      "assertion_ttl": PEER_ASSERTION_TTL}, args.sign_workers)
            log(f"peer (oidc-provider) up at {peer.issuer}")

        # Checks before any load: one exchange in full, and a replay refused, per scenario.
        for key, mode, alg, _ in scenarios:
            checks[key] = check_exchange(http, base, signers[alg], run_tag, mode, label=key)
        if peer:
            checks["peer"] = check_exchange(http, base, signers["peer"], run_tag, "peer", label="peer",
                                            url=peer.token_url)

        costs = verify_cost(binary)
        if costs:
            log("one verification on one thread: " + ", ".join(
                f"{a} {costs[a]['verify_jws_us']:.1f} µs"
                for a in ("RS256", "ES256") if a in costs))

        t, c, d = args.threads, args.connections, args.duration

        # Background load: other work on this machine (builds, tests) skews every number.
        busy0, total0 = machine_cpu()
        time.sleep(2)
        busy1, total1 = machine_cpu()
        background = (busy1 - busy0) / max(1, total1 - total0)
        loadavg = Path("/proc/loadavg").read_text().split()[0]
        log(f"background CPU before the runs: {background * 100:.0f} % of all cores (loadavg {loadavg})")
        if background > 0.10:
            log("warning: the machine is not idle; results will be lower than on a quiet machine")

        # 1. Bare HTTPS endpoint.
        bare = run_wrk(base + "healthz", t, c, d, ["get"], "healthz", work, server.proc.pid)
        log(f"healthz: {bare['rps']:.0f} req/s, p50 {bare['p50_us'] / 1000:.2f} ms, p99 {bare['p99_us'] / 1000:.2f} ms")

        # 2. Each exchange scenario: warm-up, sign right before, measured run. The `jti`s a
        # scenario consumed are counted as it ends: the server purges expired ones every minute.
        for key, mode, alg, _ in scenarios:
            if time.monotonic() - connected_at > 150:
                # Demo upstream tokens live 300 s; a scenario takes well under a minute.
                connect_demo_account(base, ca, demo)
                connected_at = time.monotonic()
                log("demo account connected again (fresh upstream token)")
            before = token_200s(http, base)
            results[key] = measure_exchange(signers[alg], mode, base, args, run_tag, work, server.proc.pid,
                                            connected_at, label=key)
            after = settled_token_200s(http, base)
            srv_200[key] = None if None in (before, after) else after - before
            try:
                jti_counts[key] = db_counts(data_dir, f":{run_tag}-{key}-")[2]
            except Exception as e:  # noqa: BLE001 - informative only
                log(f"could not read jti counts: {e}")
        srv_total = settled_token_200s(http, base)
        try:
            audit_total = db_counts(data_dir, "-")[0]
        except Exception as e:  # noqa: BLE001 - informative only
            audit_total = None
            log(f"could not read audit counts: {e}")

        # 3. The peer, same wrk settings, same run (Latchkey idle meanwhile).
        if peer:
            results["peer"] = measure_exchange(signers["peer"], "peer", base, args, run_tag, work, peer.proc.pid,
                                               None, label="peer", url=peer.token_url)
    finally:
        for sg in signers.values():
            sg.close()
        if peer:
            peer.stop()
        server.stop()

    info = machine_info()
    report = {
        "started": started, "info": info, "threads": t, "conns": c, "duration": d, "bare": bare,
        "results": results, "scenarios": scenarios, "checks": checks, "costs": costs,
        "binary": f"{binary} (built {dt.datetime.fromtimestamp(binary.stat().st_mtime, dt.timezone.utc):%Y-%m-%d %H:%M UTC})",
        "background": background, "loadavg": loadavg, "fs": fs_of(work),
        "srv_200": srv_200, "srv_total": srv_total, "audit_total": audit_total, "jti_counts": jti_counts,
    }
    print()
    print(table(report))
    md = markdown(report)
    if args.json:
        Path(args.json).write_text(json.dumps(summary(report), indent=1))
    if args.no_append:
        print()
        print(md)
    else:
        path = Path(args.results)
        new = not path.exists()
        with open(path, "a") as f:
            if new:
                f.write("# Latchkey benchmark results\n\nAppended by `bench/exchange.py`; newest last.\n")
            f.write("\n" + md)
        log(f"appended results to {path}")
    if args.keep:
        log(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def ms(us: float) -> str:
    return f"{us / 1000:.2f} ms"


def _verdict(ok: bool) -> str:
    return "meets" if ok else "below target"


def ratios(r: dict) -> dict:
    """Same-run ratios: each exchange ÷ the bare endpoint, and ÷ the peer."""
    res, bare = r["results"], r["bare"]["rps"]
    peer = res.get("peer", {}).get("ok_rps")
    out = {}
    for key, *_ in r["scenarios"]:
        x = res[key]["ok_rps"]
        out[key] = {"bare": x / bare if bare else None, "peer": x / peer if peer else None}
    return out


def checks_lines(r: dict) -> list[str]:
    """After-run checks: every release durable (audit entry, consumed `jti`s); replays refused.

    The server's `/metrics` counts answered 200s. A request wrk abandons in flight when it stops
    (at most one per connection per wrk run) may still be released — committed, never answered —
    so the database may hold up to that many releases more than `/metrics` counted, never fewer."""
    lines = []
    slack = r["conns"] * 2  # warm-up and measured run: each ends with up to one request per connection in flight

    def verdict(have: int, want: int, per: int) -> str:
        extra = have - want
        if extra == 0:
            return "**match**"
        if 0 < extra <= slack * per and extra % per == 0:
            return (f"**match** (+{extra // per} releases of requests abandoned in flight when wrk stopped: "
                    f"committed, never answered)")
        return "**MISMATCH**"

    for key, mode, *_ in r["scenarios"]:
        n200, jtis = r["srv_200"].get(key), r["jti_counts"].get(key)
        if n200 is None or jtis is None:
            continue
        per = 2 if mode == "pkjwt" else 1
        seen = r["results"][key]["warm"]["ok"] + r["results"][key]["ok"]
        lines.append(f"{key}: {n200} 200s by the server's count (wrk saw {seen}, the rest were in flight when it "
                     f"stopped), {jtis} consumed `jti`s in the database, {n200 * per} expected: "
                     + verdict(jtis, n200 * per, per))
    if r["audit_total"] is not None and r["srv_total"] is not None:
        slack *= len(r["scenarios"])
        lines.append(f"whole session: {r['audit_total']} `token.release` allow audit entries, {r['srv_total']} 200s on "
                     f"`POST /oauth/token` by the server's count: " + verdict(r["audit_total"], r["srv_total"], 1))
    refused = ", ".join(f"{k} {v[2]}" for k, v in r["checks"].items())
    ok = all(v[1] for v in r["checks"].values())
    lines.append(f"single-use check before load (replayed body): {refused} ({'all refused' if ok else '**NOT ALL REFUSED**'})")
    for key, x in r["results"].items():
        if x["exhausted"]:
            lines.append(f"**the {key} batch ran out** ({x['exhausted']} replays refused): its rate is a lower bound")
        if x["capped"]:
            lines.append(f"the {key} batch was capped by signing time (60 s `iat` limit; the peer: its `exp`)")
    return lines


def rows(r: dict) -> list[tuple]:
    """(label, result, requests/s) for every measured endpoint, in table order."""
    out = [("bare `GET /healthz` (same server)", r["bare"], r["bare"]["rps"])]
    for key, _, _, label in r["scenarios"]:
        out.append((label, r["results"][key], r["results"][key]["ok_rps"]))
    if "peer" in r["results"]:
        out.append((PEER_LABEL, r["results"]["peer"], r["results"]["peer"]["ok_rps"]))
    return out


def target_lines(r: dict) -> list[str]:
    res, rat = r["results"], ratios(r)
    out = []
    if "secret" in res:
        e = res["secret"]
        out.append(f"≥ {TARGETS['rps']:,} exchanges/s (RS256, client secret) → {e['ok_rps']:,.0f} "
                   f"({_verdict(e['ok_rps'] >= TARGETS['rps'])}; ×{TARGETS['rps'] / e['ok_rps']:.1f} short)"
                   if e["ok_rps"] < TARGETS["rps"] else f"≥ {TARGETS['rps']:,} exchanges/s → {e['ok_rps']:,.0f} (meets)")
        p99 = e["p99_us"] / 1000
        out.append(f"p99 ≤ {TARGETS['p99_ms']:.0f} ms → {p99:.2f} ms ({_verdict(p99 <= TARGETS['p99_ms'])})")
        b = rat["secret"]["bare"]
        out.append(f"≥ {TARGETS['ratio'] * 100:.0f} % of the bare endpoint, same run → {b * 100:.1f} % "
                   f"({_verdict(b >= TARGETS['ratio'])})")
        pr = rat["secret"]["peer"]
        if pr is not None:
            out.append(f"≥ 10× the peer, same run → {pr:.1f}× ({_verdict(pr >= 10)})")
    if "pkjwt" in res:
        x = res["pkjwt"]["ok_rps"]
        out.append(f"≥ {TARGETS['pkjwt_rps']:,}/s with `private_key_jwt` → {x:,.0f} ({_verdict(x >= TARGETS['pkjwt_rps'])})")
    return out


def table(r: dict) -> str:
    rat = ratios(r)
    hdr = ("endpoint", "req/s", "p50", "p99", "non-2xx", "server CPU", "machine busy", "÷ bare", "÷ peer")
    body = []
    for label, x, rate in rows(r):
        key = next((k for k, _, _, lb in r["scenarios"] if lb == label), None)
        body.append((label.replace("`", ""), f"{rate:.0f}", ms(x["p50_us"]), ms(x["p99_us"]), str(x["non200"]),
                     f"{x['server_cores']:.2f} cores", f"{x['machine_busy'] * 100:.0f} %",
                     f"{rat[key]['bare'] * 100:.1f} %" if key else "",
                     f"{rat[key]['peer']:.1f}×" if key and rat[key]["peer"] else ""))
    w = [max(len(row[i]) for row in [hdr, *body]) for i in range(len(hdr))]
    lines = ["  ".join(cell.rjust(w[i]) if i else cell.ljust(w[i]) for i, cell in enumerate(row)) for row in [hdr, *body]]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    lines.append(f"background CPU before the runs: {r['background'] * 100:.0f} %")
    if r["costs"]:
        for a in ("RS256", "ES256"):
            if a in r["costs"]:
                v = r["costs"][a]
                lines.append(f"one {a} verification, one thread: verify_jws {v['verify_jws_us']:.1f} µs "
                             f"(≈ {1e6 / v['verify_jws_us']:,.0f}/s per core)")
    lines.append("targets (DESIGN.md, not asserted):")
    lines += ["  " + t.replace("`", "") for t in target_lines(r)]
    lines += [ln.replace("`", "").replace("**", "") for ln in checks_lines(r)]
    return "\n".join(lines)


def markdown(r: dict) -> str:
    i = r["info"]
    rat = ratios(r)
    when = r["started"].strftime("%Y-%m-%d %H:%M UTC")
    out = [
        f"## {when} — commit {i['commit']}",
        "",
        f"- Binary: `{r['binary']}` (release profile); commit is HEAD at run time, the working tree may differ",
        f"- Machine: {i['nproc']} cores, CPU `{i['cpu']}`; load generator on the same machine",
        f"- Background CPU in the 2 s before the runs: {r['background'] * 100:.0f} % of all cores "
        f"(1-min loadavg {r['loadavg']}){' — **machine not idle, numbers are pessimistic**' if r['background'] > 0.10 else ''}",
        f"- Data dir filesystem: {r['fs']} (SQLite WAL, `synchronous=FULL`)"
        + (" — **tmpfs: fsync is free, NOT durable; diagnostic only**" if r["fs"].startswith("tmpfs") else ""),
        f"- Load: `{i['wrk']}`, `-t{r['threads']} -c{r['conns']} -d{r['duration']}s --latency`, HTTPS keep-alive to "
        f"127.0.0.1; one distinct pre-signed body per request, signed right before each run",
        "",
        "| endpoint | requests/s | p50 | p99 | p99.9 | non-2xx | server CPU | machine busy | ÷ bare | ÷ peer |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, x, rate in rows(r):
        key = next((k for k, _, _, lb in r["scenarios"] if lb == label), None)
        out.append(f"| {label} | {rate:,.0f} | {ms(x['p50_us'])} | {ms(x['p99_us'])} | {ms(x['p999_us'])} | {x['non200']} | "
                   f"{x['server_cores']:.2f} cores | {x['machine_busy'] * 100:.0f} % | "
                   + (f"{rat[key]['bare'] * 100:.1f} % | " if key else "| ")
                   + (f"{rat[key]['peer']:.1f}× |" if key and rat[key]["peer"] else "|"))
    out.append("")
    if r["costs"]:
        for a in ("RS256", "ES256"):
            if a in r["costs"]:
                v = r["costs"][a]
                out.append(f"- One {a} verification on one thread (`latchkey bench verify-cost`): `verify_jws` "
                           f"{v['verify_jws_us']:.1f} µs (≈ {1e6 / v['verify_jws_us']:,.0f}/s per core)")
    out.append("- Targets (DESIGN.md, not asserted): " + "; ".join(target_lines(r)))
    out.append("- Server CPU: CPU seconds of the server process (Latchkey, or node for the peer) per wall second "
               "(2.00 = both cores); machine busy: all processes incl. wrk")
    out += [f"- {ln}" for ln in checks_lines(r)]
    out.append("")
    return "\n".join(out)


def summary(r: dict) -> dict:
    """The figures bench/run puts in its table."""
    def fig(x: dict, rate: float) -> dict:
        return {"rps": rate, "p50_ms": x["p50_us"] / 1000, "p99_ms": x["p99_us"] / 1000,
                "non200": x["non200"], "server_cores": x["server_cores"], "machine_busy": x["machine_busy"]}
    out = {"started": r["started"].isoformat(), "info": r["info"], "background": r["background"],
           "bare": fig(r["bare"], r["bare"]["rps"]), "costs": r["costs"], "ratios": ratios(r),
           "labels": {k: lb for k, _, _, lb in r["scenarios"]} | {"peer": PEER_LABEL},
           "checks_ok": all(("MISMATCH" not in ln and "NOT ALL" not in ln) for ln in checks_lines(r)),
           "lower_bound": [k for k, x in r["results"].items() if x["exhausted"]]}
    for key, x in r["results"].items():
        out[key] = fig(x, x["ok_rps"])
    return out


if __name__ == "__main__":
    sys.exit(main())

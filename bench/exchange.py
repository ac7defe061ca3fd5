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
from pathlib import Path

import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

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


def register_agent(binary: Path, data_dir: Path, work: Path, env: dict[str, str] | None = None) -> dict:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    pub_path = work / "bench-agent.pub.pem"
    pub_path.write_bytes(pub_pem)

    out = sh(
        [str(binary), "agent", "add", "bench-agent", "--public-key", str(pub_path), "--secret", "--json",
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
    }


# --------------------------------------------------------------------------------------------
# Signing (multiprocessing)
# --------------------------------------------------------------------------------------------

_SIGNER: dict = {}


def _signer_init(ctx: dict) -> None:
    _SIGNER.update(ctx)
    _SIGNER["key"] = serialization.load_pem_private_key(ctx["private_pem"], password=None)
    _SIGNER["header"] = b64url(
        json.dumps({"alg": "RS256", "typ": "token-vault-req+jwt", "kid": ctx["kid"]}, separators=(",", ":")).encode()
    )
    # Client assertion (private_key_jwt): same key, no `typ`.
    _SIGNER["assertion_header"] = b64url(json.dumps({"alg": "RS256", "kid": ctx["kid"]}, separators=(",", ":")).encode())
    # Everything but the subject token (and the client assertion) is the same for every request.
    _SIGNER["prefix"] = {
        "secret": urllib.parse.urlencode(
            {
                "grant_type": GRANT_TYPE,
                "client_id": ctx["client_id"],
                "client_secret": ctx["client_secret"],
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
    }


def _sign(header: str, claims: dict) -> str:
    signing_input = header + "." + b64url(json.dumps(claims, separators=(",", ":")).encode())
    sig = _SIGNER["key"].sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + b64url(sig)


def _subject_jwt(jti: str) -> str:
    now = int(time.time())
    claims = {
        "iss": _SIGNER["client_id"],
        "sub": _SIGNER["user_id"],
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
    claims = {"iss": cid, "sub": cid, "aud": _SIGNER["aud"], "iat": now, "exp": now + 60, "jti": jti}
    return _sign(_SIGNER["assertion_header"], claims)


def _body(mode: str, jti: str) -> str:
    # JWTs are base64url + '.', all safe in a form body without escaping.
    prefix = _SIGNER["prefix"][mode]
    if mode == "pkjwt":
        return f"{prefix}&client_assertion={_client_assertion(jti + '-a')}&subject_token={_subject_jwt(jti)}"
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
        _signer_init(ctx)  # for single bodies in this process

    def one(self, tag: str, mode: str = "secret") -> str:
        return _sign_range((mode, tag, 0, 1))[0]

    def assertion(self, jti: str) -> str:
        """A `private_key_jwt` client assertion alone (e.g. for `grant_type=client_credentials`)."""
        return _client_assertion(jti)

    def batch(self, tag: str, n: int, mode: str = "secret") -> tuple[list[str], float]:
        if self.pool is None:
            raise RuntimeError("Signer(workers=0) signs single bodies only")
        t0 = time.monotonic()
        chunk = max(1, min(2000, math.ceil(n / (self.workers * 8))))
        jobs = [(mode, tag, i, min(chunk, n - i)) for i in range(0, n, chunk)]
        bodies: list[str] = []
        for part in self.pool.imap(_sign_range, jobs):
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
                     connected_at: float) -> dict:
    """Warm-up, sizing, signing right before, then the measured run for one client-auth mode.

    `mode` is "secret" (client_secret_post) or "pkjwt" (private_key_jwt: two signatures per body,
    so the signing rate, and with it the cap, is measured for that body kind)."""
    t, c, d = args.threads, args.connections, args.duration
    sfx = "" if mode == "secret" else f"-{mode}"
    name = "exchange" if mode == "secret" else "exchange (private_key_jwt)"
    per_body = 1 if mode == "secret" else 2  # signatures per body

    # Signing rate and warm-up exchange run to size the batch.
    probe, probe_s = signer.batch(f"{run_tag}{sfx}-probe", 2000 * args.sign_workers // per_body, mode)
    sign_rate = len(probe) / probe_s
    log(f"{name}: signing rate: {sign_rate:.0f} bodies/s ({per_body} signature{'s' if per_body > 1 else ''} "
        f"a body) with {args.sign_workers} processes")
    sign_budget = SUBJECT_MAX_AGE - SAFETY - d  # seconds we may spend signing the main batch
    max_bodies = int(sign_rate * sign_budget)

    warm_n = max(len(probe), min(max_bodies, int(sign_rate * 3)))
    extra, _ = signer.batch(f"{run_tag}{sfx}-warm", warm_n - len(probe), mode)
    warm_bodies = probe + extra
    warm_file = work / f"bodies-warmup{sfx}.txt"
    write_bodies(warm_file, warm_bodies)
    warm = run_wrk(base + "oauth/token", t, c, args.warmup, ["post", str(warm_file), str(t)], f"warmup{sfx}", work,
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
    n = min(want, max_bodies)
    capped = n < want
    if capped:
        log(f"batch capped at {n} bodies (want {want}): signing must finish {SAFETY + d}s before the 60 s iat limit")

    # The measured exchange run: sign right before, then load.
    bodies, sign_s = signer.batch(f"{run_tag}{sfx}-run", n, mode)
    main_file = work / f"bodies-run{sfx}.txt"
    write_bodies(main_file, bodies)
    del bodies
    log(f"signed {n} bodies in {sign_s:.1f}s; oldest body will be {sign_s + d:.0f}s old at the end of the run")
    if time.monotonic() - connected_at + d + 5 > 270:
        log("warning: upstream token may be refreshed during the run (demo tokens live 300 s)")
    ex = run_wrk(base + "oauth/token", t, c, d, ["post", str(main_file), str(t)], f"exchange{sfx}", work, server_pid)
    log(f"{name}: {ex['ok_rps']:.0f} exchanges/s ({ex['non200']} non-200), p50 {ex['p50_us'] / 1000:.2f} ms, "
        f"p99 {ex['p99_us'] / 1000:.2f} ms")
    ex.update(sign_s=sign_s, bodies=n, warm=warm, sign_rate=sign_rate, capped=capped)
    return ex


def check_exchange(http: requests.Session, base: str, signer: Signer, run_tag: str, mode: str) -> tuple[int, bool, str]:
    """One exchange checked in full, then one body sent twice (single-use `jti`).

    Returns (number of 200s given, replay refused?, replay status text)."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    sfx = "" if mode == "secret" else f"-{mode}"
    what = "check exchange" if mode == "secret" else "check exchange (private_key_jwt)"
    r = http.post(base + "oauth/token", data=signer.one(f"{run_tag}-check{sfx}", mode), headers=form, timeout=10)
    if r.status_code != 200 or "access_token" not in r.json():
        raise SystemExit(f"{what} failed: HTTP {r.status_code}\n{r.text}")
    log(f"{what} OK: token_type={r.json().get('token_type')!r} expires_in={r.json().get('expires_in')}")

    body = signer.one(f"{run_tag}-replay{sfx}", mode)
    r1 = http.post(base + "oauth/token", data=body, headers=form, timeout=10)
    r2 = http.post(base + "oauth/token", data=body, headers=form, timeout=10)
    # client_secret_post: the subject `jti` is reused (400 invalid_grant). private_key_jwt: the
    # assertion's `jti` is checked first (401 invalid_client).
    ok = r1.status_code == 200 and r2.status_code in ((400,) if mode == "secret" else (400, 401))
    err = ""
    try:
        err = r2.json().get("error", "")
    except ValueError:
        pass
    log(f"replay check{'' if mode == 'secret' else ' (private_key_jwt)'}: first {r1.status_code}, replay "
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
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--tmp-root", default=None,
                    help="parent of the temporary data dir (default: the system temp dir). Diagnostic only: "
                         "a tmpfs such as /dev/shm makes fsync free, so the run is no longer durable")
    ap.add_argument("--skip-pkjwt", action="store_true",
                    help="leave out the exchange with private_key_jwt client authentication")
    args = ap.parse_args()

    binary = Path(args.bin).resolve()
    if not binary.exists():
        raise SystemExit(f"{binary} not found: cargo build --release -p latchkey-cli")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    if args.duration + SAFETY >= SUBJECT_MAX_AGE:
        raise SystemExit(f"--duration must be below {SUBJECT_MAX_AGE - SAFETY}s (subject tokens expire at 60 s)")

    started = dt.datetime.now(dt.timezone.utc)
    work = Path(tempfile.mkdtemp(prefix="latchkey-bench-", dir=args.tmp_root))
    data_dir = work / "data"
    data_dir.mkdir()
    server = Server(binary, data_dir, work / "server.log")
    signer = None
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

        agent = register_agent(binary, data_dir, work)
        log(f"agent {agent['client_id']} registered (kid {agent['kid']}), granted {SCOPES!r} on {CONNECTION}")

        ctx = {**agent, "user_id": demo["user_id"], "aud": aud}
        signer = Signer(ctx, args.sign_workers)
        run_tag = f"bench-{os.getpid()}-{int(time.time())}"

        # Checks before any load: one exchange in full, and a replay refused, per scenario.
        http = https_session(ca)
        checks_200, replay_ok, replay_status = check_exchange(http, base, signer, run_tag, "secret")
        srv_checks = token_200s(http, base)  # the server's count of 200s on POST /oauth/token
        pk_checks_200, pk_replay_ok, pk_replay_status = 0, None, None
        if not args.skip_pkjwt:
            pk_checks_200, pk_replay_ok, pk_replay_status = check_exchange(http, base, signer, run_tag, "pkjwt")
        srv_pk_checks = token_200s(http, base)

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

        # 2. Exchange, client_secret_post: warm-up, sign right before, measured run.
        ex = measure_exchange(signer, "secret", base, args, run_tag, work, server.proc.pid, connected_at)

        # Audit events and used `jti`s (the server's own durable record) against its 200s. The
        # `jti`s are counted as each scenario ends: the server purges expired ones every minute
        # (`exp` + 10 s), which could otherwise remove this session's oldest before the end.
        pk_part = f":{run_tag}-pkjwt-"  # in the `jti` keys of the private_key_jwt load (not its checks)
        counts = {}
        srv_a = settled_token_200s(http, base)
        try:
            counts["a"] = db_counts(data_dir, pk_part)
        except Exception as e:  # noqa: BLE001 - informative only
            log(f"could not read audit counts: {e}")

        # 3. Exchange, private_key_jwt: the same, each body with its own client assertion.
        pk = srv_b = None
        if not args.skip_pkjwt:
            pk = measure_exchange(signer, "pkjwt", base, args, run_tag, work, server.proc.pid, connected_at)
            srv_b = settled_token_200s(http, base)
            try:
                counts["b"] = db_counts(data_dir, pk_part)
            except Exception as e:  # noqa: BLE001 - informative only
                log(f"could not read audit counts: {e}")
    finally:
        if signer:
            signer.close()
        server.stop()

    ratio = ex["ok_rps"] / bare["rps"] if bare["rps"] else float("nan")
    pk_ratio = (pk["ok_rps"] / bare["rps"] if bare["rps"] else float("nan")) if pk else None
    # Every 200 of the session, as the harness saw them (checks, replay checks, warm-ups, runs)...
    secret_200 = checks_200 + ex["warm"]["ok"] + ex["ok"]
    pk_200 = (pk_checks_200 + pk["warm"]["ok"] + pk["ok"]) if pk else 0
    # ...and as the server counted them (it also answers what wrk left in flight when it stopped).
    srv_secret = srv_pk = None
    if None not in (srv_checks, srv_pk_checks, srv_a) and (pk is None or srv_b is not None):
        srv_secret = srv_checks + (srv_a - srv_pk_checks)
        srv_pk = (srv_pk_checks - srv_checks) + ((srv_b - srv_a) if pk else 0)
    # What the database recorded: releases at the end; `jti`s as each scenario ended.
    audit_ok = used_jtis = None
    if "a" in counts and (pk is None or "b" in counts):
        last = counts["b"] if pk else counts["a"]
        audit_ok = last[0]
        used_jtis = counts["a"][1] + (last[2] - counts["a"][2])
    info = machine_info()
    report = {
        "started": started, "info": info, "threads": t, "conns": c, "duration": d,
        "bare": bare, "ex": ex, "pk": pk, "ratio": ratio, "pk_ratio": pk_ratio,
        "binary": f"{binary} (built {dt.datetime.fromtimestamp(binary.stat().st_mtime, dt.timezone.utc):%Y-%m-%d %H:%M UTC})",
        "background": background, "loadavg": loadavg, "audit_ok": audit_ok, "used_jtis": used_jtis,
        "replay_ok": replay_ok, "replay_status": replay_status, "pk_replay_ok": pk_replay_ok,
        "pk_replay_status": pk_replay_status, "fs": fs_of(work),
        "secret_200": secret_200, "pk_200": pk_200, "srv_secret": srv_secret, "srv_pk": srv_pk,
    }
    print()
    print(table(report))
    md = markdown(report)
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


PK_LABEL = "(exchange, private_key_jwt)"


def counts_check(r: dict) -> tuple[str, bool] | None:
    """The after-run count line (Markdown) and whether it matches every 200 of the session."""
    if r["audit_ok"] is None:
        return None
    seen = r["secret_200"] + r["pk_200"]
    if r["srv_secret"] is not None:
        s200, p200, source = r["srv_secret"], r["srv_pk"], "the server's `/metrics` count"
    else:
        s200, p200, source = r["secret_200"], r["pk_200"], "as the harness saw them (no `/metrics` count)"
    want_audit, want_jtis = s200 + p200, s200 + 2 * p200
    ok = r["audit_ok"] == want_audit and r["used_jtis"] == want_jtis
    if r["pk"] is not None:
        split = f"{want_audit} ({s200} client_secret_post + {p200} private_key_jwt)"
        jtis = (f"{want_jtis} `jti`s ({s200} + 2 × {p200}: a private_key_jwt release consumes two, the client "
                f"assertion's and the subject's)")
    else:
        split, jtis = f"{want_audit}", f"{want_jtis} `jti`s"
    inflight = want_audit - seen
    line = (
        f"After the runs the database holds {r['audit_ok']} `token.release` allow audit events and "
        f"{r['used_jtis']} used `jti`s (whole session: checks, replay checks, warm-ups and runs; `jti`s counted as "
        f"each scenario ended, before the server's minute purge of expired ones can touch them). 200s on "
        f"`POST /oauth/token`, {source}: {split}"
        + (f" (wrk and the checks saw {seen}; the other {inflight} were in flight when wrk stopped)"
           if inflight and r["srv_secret"] is not None else "")
        + f", so {want_audit} releases and {jtis} expected: "
        + ("**match**" if ok else "**MISMATCH**")
    )
    return line, ok


def table(r: dict) -> str:
    b, e, pk = r["bare"], r["ex"], r["pk"]

    def row(label: str, x: dict, rate: float) -> tuple[str, ...]:
        return (label, f"{rate:.0f}", ms(x["p50_us"]), ms(x["p99_us"]), str(x["non200"]), str(x["requests"]),
                f"{x['server_cores']:.2f} cores", f"{x['machine_busy'] * 100:.0f} %")

    rows = [
        ("endpoint", "req/s", "p50", "p99", "non-2xx", "requests", "server CPU", "machine busy"),
        row("GET /healthz", b, b["rps"]),
        row("POST /oauth/token", e, e["ok_rps"]),
    ]
    if pk:
        rows.append(row(f"POST /oauth/token {PK_LABEL}", pk, pk["ok_rps"]))
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w[i]) if i else cell.ljust(w[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    lines.append(f"background CPU before the runs: {r['background'] * 100:.0f} %")
    lines.append(f"ratio exchange/bare: {r['ratio'] * 100:.1f} %")
    if pk:
        lines.append(f"ratio exchange (private_key_jwt)/bare: {r['pk_ratio'] * 100:.1f} %")
    lines.append(
        f"targets (not asserted): >= {TARGETS['rps']:,} exchanges/s, p99 <= {TARGETS['p99_ms']:.0f} ms, "
        f">= {TARGETS['ratio'] * 100:.0f} % of bare"
        + (f"; private_key_jwt >= {TARGETS['pkjwt_rps']:,}/s" if pk else "")
    )
    lines.append(
        f"  measured:              {e['ok_rps']:,.0f} exchanges/s ({_verdict(e['ok_rps'] >= TARGETS['rps'])}), "
        f"p99 {ms(e['p99_us'])} ({_verdict(e['p99_us'] / 1000 <= TARGETS['p99_ms'])}), "
        f"{r['ratio'] * 100:.1f} % ({_verdict(r['ratio'] >= TARGETS['ratio'])})"
        + (f"; private_key_jwt {pk['ok_rps']:,.0f}/s ({_verdict(pk['ok_rps'] >= TARGETS['pkjwt_rps'])})" if pk else "")
    )
    counts = counts_check(r)
    if counts:
        lines.append(counts[0].replace("`", "").replace("**", ""))
    for label, x in (("exchange", e), ("private_key_jwt exchange", pk)):
        if x and x["exhausted"]:
            lines.append(f"WARNING: the {label} batch ran out; {x['exhausted']} replayed requests (refused) — "
                         f"its rate is a lower bound")
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "meets" if ok else "below target"


def markdown(r: dict) -> str:
    b, e, pk, i = r["bare"], r["ex"], r["pk"], r["info"]
    when = r["started"].strftime("%Y-%m-%d %H:%M UTC")

    def row(label: str, x: dict, rate: float) -> str:
        return (f"| {label} | {rate:.0f} | {ms(x['p50_us'])} | {ms(x['p99_us'])} | {ms(x['p999_us'])} | "
                f"{x['non200']} | {x['requests']} | {x['server_cores']:.2f} cores ({x['server_sys']:.2f} sys) | "
                f"{x['machine_busy'] * 100:.0f} % |")

    def signed(x: dict) -> str:
        return (f"one distinct pre-signed body per request ({x['bodies']} signed in {x['sign_s']:.1f} s at "
                f"{x['sign_rate']:.0f}/s; warm-up {x['warm']['ok_rps']:.0f}/s over its run)")

    out = [
        f"## {when} — commit {i['commit']}",
        "",
        f"- Binary: `{r['binary']}` (release profile); commit is HEAD at run time, the working tree may differ",
        f"- Machine: {i['nproc']} cores, CPU `{i['cpu']}`; load generator on the same machine",
        f"- Background CPU in the 2 s before the runs: {r['background'] * 100:.0f} % of all cores "
        f"(1-min loadavg {r['loadavg']}){' — **machine not idle, numbers are pessimistic**' if r['background'] > 0.10 else ''}",
        f"- Data dir filesystem: {r['fs']} (SQLite WAL, `synchronous=FULL`)"
        + (" — **tmpfs: fsync is free, NOT durable; diagnostic only**" if r["fs"].startswith("tmpfs") else ""),
        f"- Load: `{i['wrk']}`, `-t{r['threads']} -c{r['conns']} -d{r['duration']}s --latency`, HTTPS keep-alive to 127.0.0.1",
        f"- Exchange: RS256 subject JWT, `client_secret_post`, cached upstream token (`demo-git`), {signed(e)}",
    ]
    if pk:
        out.append(
            f"- Exchange (private_key_jwt): the same, but the agent authenticates with an RS256 client assertion "
            f"signed by the same key (two signature verifications per request), {signed(pk)}"
        )
    out += [
        "",
        "| endpoint | requests/s | p50 | p99 | p99.9 | non-2xx | requests | server CPU | machine busy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        row("`GET /healthz`", b, b["rps"]),
        row("`POST /oauth/token` (exchange)", e, e["ok_rps"]),
    ]
    if pk:
        out.append(row(f"`POST /oauth/token` {PK_LABEL}", pk, pk["ok_rps"]))
    out += [
        "",
        f"- Ratio exchange/bare: **{r['ratio'] * 100:.1f} %**"
        + (f"; exchange (private_key_jwt)/bare: **{r['pk_ratio'] * 100:.1f} %**" if pk else ""),
        f"- Targets (not asserted): ≥ {TARGETS['rps']:,} exchanges/s → {e['ok_rps']:,.0f} "
        f"({_verdict(e['ok_rps'] >= TARGETS['rps'])}); p99 ≤ {TARGETS['p99_ms']:.0f} ms → {ms(e['p99_us'])} "
        f"({_verdict(e['p99_us'] / 1000 <= TARGETS['p99_ms'])}); ≥ {TARGETS['ratio'] * 100:.0f} % of bare → "
        f"{r['ratio'] * 100:.1f} % ({_verdict(r['ratio'] >= TARGETS['ratio'])})"
        + (f"; private_key_jwt ≥ {TARGETS['pkjwt_rps']:,}/s → {pk['ok_rps']:,.0f} "
           f"({_verdict(pk['ok_rps'] >= TARGETS['pkjwt_rps'])})" if pk else ""),
        "- Server CPU = CPU seconds the `latchkey` process used per wall second of the run (2.00 = both "
        "cores); machine busy = all processes incl. wrk, iowait counted as idle",
        f"- Socket errors: healthz connect/read/write/timeout "
        f"{b['err_connect']}/{b['err_read']}/{b['err_write']}/{b['err_timeout']}, exchange "
        f"{e['err_connect']}/{e['err_read']}/{e['err_write']}/{e['err_timeout']}"
        + (f", private_key_jwt {pk['err_connect']}/{pk['err_read']}/{pk['err_write']}/{pk['err_timeout']}" if pk else ""),
    ]
    counts = counts_check(r)
    if counts:
        out.append(f"- {counts[0]}")
    out.append(
        f"- Single-use check before load: replayed body refused: {'yes' if r['replay_ok'] else 'NO'} "
        f"({r['replay_status']})"
        + (f"; private_key_jwt: {'yes' if r['pk_replay_ok'] else 'NO'} ({r['pk_replay_status']})" if pk else "")
    )
    for label, x in (("", e), (" private_key_jwt", pk)):
        if x and x["exhausted"]:
            out.append(f"- **The{label} batch ran out** ({x['exhausted']} replays refused): its exchange rate "
                       f"is a lower bound")
        if x and x["capped"]:
            out.append(f"- The{label} batch was capped by signing time (60 s `iat` limit)")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())

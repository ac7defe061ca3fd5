#!/usr/bin/env bash
# Latchkey load benchmarks, on 127.0.0.1 only.
#   bash bench/run.sh [exchange.py options, e.g. --duration 10 --connections 32 --no-append]
#       token exchange vs. bare GET /healthz (bench/exchange.py)
#   bash bench/run.sh proxy [proxy.py options, e.g. --duration 10 --no-append]
#       proxy call vs. direct demo API call vs. bare GET /healthz (bench/proxy.py)
#   bash bench/run.sh nodes [nodes.py options, e.g. --nodes 3 --duration 10 --no-append]
#       exchange on SQLite vs. PostgreSQL with 1, 2, 3 nodes vs. bare GET /healthz (bench/nodes.py;
#       needs PostgreSQL on 127.0.0.1:5432 with trust auth for `postgres`, and psql)
#   BENCH_SKIP_BUILD=1 bash bench/run.sh [proxy|nodes]   # benchmark the binary already in target/release
# Sets up bench/.venv (requests, cryptography), installs wrk from Debian if missing, builds the
# release binary, then runs the benchmark. Every step is bounded in time.
set -euo pipefail

SCRIPT="exchange.py"
case "${1:-}" in
  proxy) SCRIPT="proxy.py"; shift ;;
  nodes) SCRIPT="nodes.py"; shift ;;
  exchange) shift ;;
esac

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH_DIR/.." && pwd)"
cd "$ROOT"

if ! command -v wrk >/dev/null 2>&1; then
  echo "[run.sh] installing wrk (Debian package)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  timeout 300 $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 300 $SUDO apt-get install -y -qq wrk
fi

if [ ! -x "$BENCH_DIR/.venv/bin/python" ]; then
  echo "[run.sh] creating $BENCH_DIR/.venv"
  python3 -m venv "$BENCH_DIR/.venv"
fi
if ! "$BENCH_DIR/.venv/bin/python" -c 'import requests, cryptography' >/dev/null 2>&1; then
  timeout 300 "$BENCH_DIR/.venv/bin/pip" install -q requests cryptography
fi

if [ "${BENCH_SKIP_BUILD:-0}" = "1" ]; then
  echo "[run.sh] BENCH_SKIP_BUILD=1: using the existing target/release/latchkey"
else
  echo "[run.sh] building release binary"
  # The first build of the workspace can take several minutes on 2 cores; later ones are quick.
  timeout 1800 cargo build --release -p latchkey-cli
fi

# exchange.py bounds itself: each wrk run is -d seconds (default 10), setup and signing
# are limited by the 60 s subject-token age; the whole run takes well under 2 minutes.
# proxy.py runs 3 × (3 s warm-up + 10 s + 5 s on one connection): about 1.5 minutes.
# nodes.py runs 2 × 10 s of /healthz and 4 exchange runs (3 s warm-up, signing, 10 s): about
# 3 minutes; on SIGTERM from `timeout` it still stops its nodes and drops its database.
exec timeout 600 "$BENCH_DIR/.venv/bin/python" "$BENCH_DIR/$SCRIPT" "$@"

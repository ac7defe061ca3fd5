#!/usr/bin/env bash
# Latchkey load benchmark: token exchange vs. bare GET /healthz, on 127.0.0.1 only.
#   bash bench/run.sh [exchange.py options, e.g. --duration 10 --connections 32 --no-append]
#   BENCH_SKIP_BUILD=1 bash bench/run.sh   # benchmark the binary already in target/release
# Sets up bench/.venv (requests, cryptography), installs wrk from Debian if missing, builds the
# release binary, then runs bench/exchange.py. Every step is bounded in time.
set -euo pipefail

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
exec timeout 600 "$BENCH_DIR/.venv/bin/python" "$BENCH_DIR/exchange.py" "$@"

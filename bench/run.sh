#!/usr/bin/env bash
# Latchkey load benchmarks, on 127.0.0.1 only.
#   bash bench/run            (= bash bench/run.sh all) everything below but nodes, one table at the
#       end (bench/report.py), appended to bench/results.md with each part's own section; ~15 min
#   bash bench/run.sh [exchange.py options, e.g. --duration 10 --connections 32 --no-append]
#       token exchange (RS256 and ES256, client secret and private_key_jwt) vs. bare GET /healthz
#       vs. the oidc-provider peer, plus one verification's cost (bench/exchange.py)
#   bash bench/run.sh scale [scale.py options, e.g. --sizes 1000,1000000 --no-append]
#       exchange p50/p99, RSS and start-up with 10^3 … 10^6 seeded accounts (bench/scale.py)
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
  all) SCRIPT="all"; shift ;;
  proxy) SCRIPT="proxy.py"; shift ;;
  nodes) SCRIPT="nodes.py"; shift ;;
  scale) SCRIPT="scale.py"; shift ;;
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

# The peer (oidc-provider, pinned in bench/peer/package-lock.json) for exchange.py.
if [ "$SCRIPT" = "exchange.py" ] || [ "$SCRIPT" = "all" ]; then
  if [ ! -d "$BENCH_DIR/peer/node_modules/oidc-provider" ]; then
    echo "[run.sh] npm ci in bench/peer (oidc-provider)"
    (cd "$BENCH_DIR/peer" && timeout 300 npm ci --no-audit --no-fund)
  fi
fi

if [ "${BENCH_SKIP_BUILD:-0}" = "1" ]; then
  echo "[run.sh] BENCH_SKIP_BUILD=1: using the existing target/release/latchkey"
else
  echo "[run.sh] building release binary"
  # The first build of the workspace can take several minutes on 2 cores; later ones are quick.
  timeout 1800 cargo build --release -p latchkey-cli
fi

# exchange.py bounds itself: each wrk run is -d seconds (default 10), setup and signing
# are limited by the 60 s subject-token age.
# proxy.py runs 3 × (3 s warm-up + 10 s + 5 s on one connection): about 1.5 minutes.
# nodes.py runs 2 × 10 s of /healthz and 4 exchange runs (3 s warm-up, signing, 10 s): about
# 3 minutes; on SIGTERM from `timeout` it still stops its nodes and drops its database.
# exchange.py with all its scenarios: 4 exchange runs and the peer, ~5 minutes.
# scale.py: seeding 10^6 accounts takes ~1–2 minutes, 4 sizes × ~40 s of load: ~6–10 minutes.
PY="$BENCH_DIR/.venv/bin/python"
if [ "$SCRIPT" = "all" ]; then
  OUT="$(mktemp -d /tmp/latchkey-bench-run-XXXXXX)"
  echo "[run.sh] all: figures in $OUT"
  status=0
  timeout 900 "$PY" "$BENCH_DIR/exchange.py" --json "$OUT/exchange.json" "$@" || status=1
  timeout 1800 "$PY" "$BENCH_DIR/scale.py" --json "$OUT/scale.json" ${BENCH_SIZES:+--sizes "$BENCH_SIZES"} || status=1
  timeout 600 "$PY" "$BENCH_DIR/proxy.py" --json "$OUT/proxy.json" || status=1
  echo
  "$PY" "$BENCH_DIR/report.py" "$OUT"
  exit $status
fi
case "$SCRIPT" in
  scale.py) LIMIT=1800 ;;
  exchange.py) LIMIT=900 ;;
  *) LIMIT=600 ;;
esac
exec timeout "$LIMIT" "$PY" "$BENCH_DIR/$SCRIPT" "$@"

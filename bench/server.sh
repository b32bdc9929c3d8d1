#!/usr/bin/env bash
# Configuration server under load: 1,000 simulated agents heartbeating every
# 10 s and 20 read requests/s for 60 s against one server on SQLite, over
# loopback. Prints p50/p99 latencies and the server's memory (VmHWM/VmRSS).
# Target: p99 < 50 ms. Knobs: AGENTS, INTERVAL, READS, DURATION.
set -euo pipefail
cd "$(dirname "$0")/.."

AGENTS=${AGENTS:-1000} INTERVAL=${INTERVAL:-10} READS=${READS:-20} DURATION=${DURATION:-60}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p rebound-cli --bin rebound
cargo build --release -q -p rebound-server --example load
bin=$CARGO_TARGET_DIR/release

work=$(mktemp -d)
server_pid=""
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

out=$("$bin/rebound" server init --data-dir "$work/data")
admin=$(awk '/^admin token:/ {print $3}' <<<"$out")
key=$(awk '/^registration key:/ {print $3}' <<<"$out")
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin/rebound" server run --data-dir "$work/data" --listen "127.0.0.1:$port" 2>"$work/server.log" &
server_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/api/v1/health" >/dev/null && break; sleep 0.1; done

echo "rebound server: $AGENTS agents / ${INTERVAL}s heartbeats + $READS reads/s for ${DURATION}s, SQLite, $(nproc) cores"
"$bin/examples/load" "http://127.0.0.1:$port" "$admin" "$key" "$AGENTS" "$INTERVAL" "$READS" "$DURATION"
grep -E '^(VmHWM|VmRSS)' "/proc/$server_pid/status" | sed 's/^/server /'

#!/usr/bin/env bash
# Delta-sync benchmark: rebound sync (over loopback TCP to a sync-server)
# against rsync (daemon on 127.0.0.1), qemu-img convert -n and the
# read-both-sides floor (cat SRC DST), on the same files, in one run.
#
#   bench/delta-sync.sh              # 8 GiB disk, as in bench/README.md
#   SIZE_GIB=1 bench/delta-sync.sh   # a quick run
#
# Environment: SIZE_GIB (default 8), WORK (scratch directory, default a new
# one under /var/tmp, removed at the end unless KEEP=1), REBOUND (binary;
# default: build target/release/rebound), DROP_CACHES=0 to keep the page cache
# between runs (default: drop it before every timed command when root),
# PCTS (changed percentages, default 1,10), SKIP_RSYNC=1 (rsync is slow),
# REPEAT=N (median of N runs for every tool but rsync; default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps
if [ -z "${REBOUND:-}" ]; then
  cargo build --release -p rebound-cli >&2
  REBOUND="${CARGO_TARGET_DIR:-target}/release/rebound"
fi
exec python3 bench/delta_sync.py --rebound "$REBOUND" "$@"

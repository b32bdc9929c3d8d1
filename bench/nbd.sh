#!/usr/bin/env bash
# NBD export benchmark: the same fio jobs against `rebound agent export`
# (dirty tracking on) and against `nbdkit file` serving the same file, in one
# run, and the ratio of the two. Not a timed test; figures go to
# bench/README.md ("## NBD export").
#
#   bench/nbd.sh                 # 1 GiB file, 15 s per job
#   BENCH_SIZE=4G BENCH_RUNTIME=30 BENCH_DIR=/mnt/fast bench/nbd.sh
#
# Needs fio (with the nbd engine), nbdkit, and a release build (made here).
set -euo pipefail
cd "$(dirname "$0")/.."

size=${BENCH_SIZE:-1G}
runtime=${BENCH_RUNTIME:-15}
for tool in fio nbdkit jq; do
  command -v "$tool" >/dev/null || { echo "bench/nbd.sh: $tool is missing (scripts/install-deps)" >&2; exit 2; }
done

target=${CARGO_TARGET_DIR:-target}
cargo build --release --locked -p rebound-cli >&2
rebound="$target/release/rebound"

work=$(mktemp -d "${BENCH_DIR:-/tmp}/rebound-nbd-bench.XXXXXX")
server_pid=
cleanup() {
  if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

disk="$work/disk.img"
sock="$work/nbd.sock"
# Allocated up front so neither server pays for block allocation.
fallocate -l "$size" "$disk"

# name | fio arguments
jobs=(
  "randwrite-4k-qd16|--rw=randwrite --bs=4k --iodepth=16"
  "seqwrite-1m-qd4|--rw=write --bs=1m --iodepth=4"
  "randread-4k-qd16|--rw=randread --bs=4k --iodepth=16"
)

wait_socket() {
  for _ in $(seq 1 200); do [[ -S "$sock" ]] && return 0; sleep 0.05; done
  echo "server did not create $sock" >&2; exit 1
}

# run_jobs LABEL URI -> lines "LABEL job iops MBps"
run_jobs() {
  local label=$1 uri=$2 spec name args out
  for spec in "${jobs[@]}"; do
    name=${spec%%|*}; args=${spec#*|}
    # shellcheck disable=SC2086
    out=$(fio --name="$name" --ioengine=nbd --uri="$uri" $args --size="$size" \
          --time_based --runtime="$runtime" --ramp_time=2 --numjobs=1 \
          --output-format=json | sed -n '/^{/,$p')  # the nbd engine prints a line first
    jq -r --arg l "$label" --arg n "$name" \
      '.jobs[0] | [$l, $n, ((.read.iops + .write.iops) | floor),
        (((.read.bw_bytes + .write.bw_bytes) / 1000000) | floor)] | @tsv' <<<"$out"
  done
}

results="$work/results.tsv"

"$rebound" agent export "$disk" --listen "unix:$sock" --state-dir "$work/state" >/dev/null &
server_pid=$!
wait_socket
run_jobs rebound "nbd+unix:///disk.img?socket=$sock" >>"$results"
kill -TERM "$server_pid"; wait "$server_pid" || true; server_pid=
dirty=$(stat -c %s "$work/state/disk.img.dirty")

nbdkit -f -U "$sock" file "$disk" &
server_pid=$!
wait_socket
run_jobs nbdkit "nbd+unix:///?socket=$sock" >>"$results"
kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=

echo "# NBD export benchmark: $size file, ${runtime}s per job, $(nproc) CPUs, $(uname -r)"
echo "# rebound: dirty tracking on (state file $dirty bytes); nbdkit $(nbdkit --version | head -1)"
printf '%-18s %12s %10s %12s %10s %8s %8s\n' job rebound-IOPS reb-MB/s nbdkit-IOPS kit-MB/s IOPS-% MB/s-%
for spec in "${jobs[@]}"; do
  name=${spec%%|*}
  read -r _ _ ri rb < <(grep -P "^rebound\t$name\t" "$results")
  read -r _ _ ki kb < <(grep -P "^nbdkit\t$name\t" "$results")
  printf '%-18s %12s %10s %12s %10s %7s%% %7s%%\n' "$name" "$ri" "$rb" "$ki" "$kb" \
    "$(( ki > 0 ? ri * 100 / ki : 0 ))" "$(( kb > 0 ? rb * 100 / kb : 0 ))"
done

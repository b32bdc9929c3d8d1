#!/usr/bin/env bash
# Journal benchmark (not a timed test): append throughput with a point every
# 4 MiB vs dd with the same fsync cadence; materialise of a sparse disk vs
# cp --sparse=always of the base plus writing the journal bytes; fold cost
# per changed GiB. Small defaults; scale with the variables below.
#
#   ROUNDS=5 APPEND_MIB=512 WRITE_KIB=64 DISK_GIB=8 BASE_MIB=512 JOURNAL_MIB=256 \
#   BENCH_DIR=/path/on/retention/fs bench/journal.sh
#
# The issue's full size is DISK_GIB=8 JOURNAL_MIB=1024.
set -euo pipefail
cd "$(dirname "$0")/.."

APPEND_MIB=${APPEND_MIB:-256}
WRITE_KIB=${WRITE_KIB:-64}
DISK_GIB=${DISK_GIB:-8}
BASE_MIB=${BASE_MIB:-512}
JOURNAL_MIB=${JOURNAL_MIB:-256}
ROUNDS=${ROUNDS:-5}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-journal}

cargo build --release -q -p rebound-journal --bin rebound-journal-bench
BIN=$CARGO_TARGET_DIR/release/rebound-journal-bench

WORK=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/journal-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p"; }
now() { date +%s.%N; }

echo "== append: ${APPEND_MIB} MiB in ${WRITE_KIB} KiB writes, point (fsync) every 4 MiB; median of ${ROUNDS} alternated rounds"
median() { sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
j_all=(); dd_all=()
for r in $(seq "$ROUNDS"); do
  out=$("$BIN" append "$WORK/vol1" "$APPEND_MIB" "$WRITE_KIB")
  j_all+=("$(echo "$out" | field mib_s)")
  t0=$(now)
  dd if=/dev/zero of="$WORK/dd.out" bs=4M count=$((APPEND_MIB / 4)) oflag=dsync status=none
  t1=$(now)
  dd_all+=("$(echo "$APPEND_MIB / ($t1 - $t0)" | bc -l)")
  printf 'round %d: journal %.1f MiB/s, dd (bs=4M oflag=dsync) %.1f MiB/s\n' "$r" "${j_all[-1]}" "${dd_all[-1]}"
  rm -rf "$WORK/vol1" "$WORK/dd.out"
done
j_mibs=$(printf '%s\n' "${j_all[@]}" | median)
dd_mibs=$(printf '%s\n' "${dd_all[@]}" | median)
printf 'append median: journal %.1f MiB/s, dd %.1f MiB/s, ratio %.2f (target >= 0.80)\n' "$j_mibs" "$dd_mibs" "$(echo "$j_mibs / $dd_mibs" | bc -l)"

echo "== materialise: ${DISK_GIB} GiB sparse disk, ${BASE_MIB} MiB base data, ${JOURNAL_MIB} MiB journal"
"$BIN" prepare "$WORK/vol2" "$DISK_GIB" "$BASE_MIB" "$JOURNAL_MIB"
sync
out=$("$BIN" materialise "$WORK/vol2" "$WORK/point.raw")
echo "materialise: $out"
m_s=$(echo "$out" | field seconds)
base="$WORK/vol2/items/mat/base/d0.raw"
t0=$(now)
cp --sparse=always "$base" "$WORK/cp.raw"
dd if=/dev/zero of="$WORK/jbytes.out" bs=4M count=$((JOURNAL_MIB / 4)) conv=fdatasync status=none
sync -f "$WORK/cp.raw"
t1=$(now)
ref_s=$(echo "$t1 - $t0" | bc -l)
printf 'reference (cp --sparse=always base + dd journal bytes): %.3f s\n' "$ref_s"
printf 'materialise ratio: %.2f x (target <= 1.3)\n' "$(echo "$m_s / $ref_s" | bc -l)"
rm -f "$WORK/cp.raw" "$WORK/jbytes.out" "$WORK/point.raw"

echo "== fold: the whole journal into the base"
out=$("$BIN" fold "$WORK/vol2")
echo "fold: $out"

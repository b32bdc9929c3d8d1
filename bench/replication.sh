#!/usr/bin/env bash
# Replication benchmark: the same fio jobs, in one run, against a plain NBD
# export (`rebound agent export` of a fresh sparse raw image) and against the
# protected, replicating machine vm1 of `rebound demo --keep` (its agent's
# NBD export, disk0), and the ratio of the two. Not a timed test.
#
#   (a) 4 KiB random writes at --rate=$WRITE_RATE (50m), iodepth 16, DURATION
#       s: completion latency p50/p99/p99.9/max; on the protected machine the
#       age of the newest recovery point, sampled every second.
#   (b) unlimited rate, RATE_SECS s each: 4 KiB random writes (iodepth 16) and
#       1 MiB sequential writes (iodepth 4): IOPS, MB/s, protected/plain.
#   (c) (a)'s load on the protected machine with the recovery site's node
#       SIGKILLed for OUTAGE s and restarted with its command line and
#       environment: replication state and backlog (if the item reports
#       them), point age, catch-up time after the restart.
#   VmRSS of every process of the lab (and of the plain export) every second.
#
#   bench/replication.sh                                    # 120/30/60 s: ~12-15 min
#   DURATION=20 RATE_SECS=5 OUTAGE=15 bench/replication.sh  # smoke: ~6 min
#
# Knobs (environment): DURATION (120), RATE_SECS (30), OUTAGE (60), RPO_SECS
# (2), DISK_SIZE (1G), WRITE_RATE (50m: fio's m is MiB, so 52.4 MB/s),
# OUTAGE_AT (s into run (c) when the node is killed; default min(10,
# DURATION/4)), OUTAGE_RUN (length of run (c); default max(DURATION,
# OUTAGE_AT+OUTAGE+20)), CATCHUP_MAX (300: s after the restart to wait for
# catch-up), SETTLE_MAX (120: s to wait, before every run, for the
# newest point to be < 2×RPO old), DEMO_TIMEOUT (900), BENCH_DIR (/tmp),
# KEEP=1 (keep the work directory), REBOUND=path (use this binary, no build;
# otherwise `cargo build --release -p rebound-cli` into
# ${CARGO_TARGET_DIR:-target}).
#
# Page cache: warm, no drop_caches; both disks are sparse raw files on the
# same filesystem (the work directory's).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

DURATION=${DURATION:-120}
RATE_SECS=${RATE_SECS:-30}
OUTAGE=${OUTAGE:-60}
RPO_SECS=${RPO_SECS:-2}
DISK_SIZE=${DISK_SIZE:-1G}
WRITE_RATE=${WRITE_RATE:-50m}
CATCHUP_MAX=${CATCHUP_MAX:-300}
SETTLE_MAX=${SETTLE_MAX:-120}
DEMO_TIMEOUT=${DEMO_TIMEOUT:-900}
KEEP=${KEEP:-0}
me=bench/replication.sh
say() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { printf '%s: %s\n' "$me" "$*" >&2; exit 2; }
now() { date +%s.%N; }
whole() { local v; for v in "$@"; do [[ ${!v} =~ ^[0-9]+$ ]] || die "$v=${!v}: a whole number of seconds"; done; }

whole DURATION RATE_SECS OUTAGE RPO_SECS CATCHUP_MAX SETTLE_MAX DEMO_TIMEOUT
((DURATION > 0 && RATE_SECS > 0 && RPO_SECS > 0)) || die "DURATION, RATE_SECS and RPO_SECS must be > 0"
q=$((DURATION / 4)); ((q >= 1)) || q=1
OUTAGE_AT=${OUTAGE_AT:-$((q < 10 ? q : 10))}
whole OUTAGE_AT
run_c=$((OUTAGE_AT + OUTAGE + 20)); ((run_c > DURATION)) || run_c=$DURATION
OUTAGE_RUN=${OUTAGE_RUN:-$run_c}
whole OUTAGE_RUN
((OUTAGE_AT + OUTAGE <= OUTAGE_RUN)) || die "OUTAGE_AT+OUTAGE ($OUTAGE_AT+$OUTAGE) must fit in OUTAGE_RUN ($OUTAGE_RUN)"

# ------------------------------------------------------------------ tools
py=$(command -v python3.11 || true)
[[ -n "$py" ]] || die "python3.11 is missing"
for tool in fio pgrep ps truncate timeout awk findmnt; do
  command -v "$tool" >/dev/null || die "$tool is missing (fio: scripts/install-deps; pgrep/ps: procps; findmnt: util-linux)"
done
# fio's nbd engine (libnbd). Without it there is no way here to reach an NBD
# export from fio: qemu-nbd and the nbd kernel module are not available.
if ! fio --enghelp 2>/dev/null | grep -qw nbd; then
  die "this fio ($(fio --version)) has no nbd engine (fio --enghelp); it needs fio >= 3.19 built with libnbd (Debian's fio package has it)"
fi
engine="fio $(fio --version | sed 's/^fio-//') --ioengine=nbd (libnbd), one connection, numjobs=1"

if [[ -n "${REBOUND:-}" ]]; then
  [[ -x "$REBOUND" ]] || die "REBOUND=$REBOUND is not an executable"
  rebound=$(readlink -f "$REBOUND")
  bin_note="$rebound (given with REBOUND=; not necessarily built from this tree)"
else
  command -v cargo >/dev/null || die "cargo is missing (or set REBOUND=path/to/rebound)"
  say "building rebound (cargo build --release -p rebound-cli; waits if another build holds the lock)"
  cargo build --release -p rebound-cli >&2 || die "the build failed (set REBOUND=path to use a binary built elsewhere)"
  rebound=$(readlink -f "${CARGO_TARGET_DIR:-target}/release/rebound")
  bin_note="$rebound (built here)"
fi
commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo "?")
if [[ -n "$(git -C "$repo" status --porcelain -- crates Cargo.lock 2>/dev/null)" ]]; then commit="$commit (crates/ modified in the working tree)"; fi

# ------------------------------------------------------------------ state
work=$(mktemp -d "${BENCH_DIR:-/tmp}/rebound-repl.XXXXXX")
lab="$work/lab"
plain="$work/plain"
mkdir -p "$plain" "$work/fio"
: >"$work/phases.tsv"
: >"$work/events.tsv"
demo_pid= export_pid= sampler_pid= fio_pid= restarted_pid=
ok=0

lab_pids() { pgrep -f -- "$lab/" 2>/dev/null | grep -vx "$$" || true; }

stop_pid() {  # stop_pid PID [SIGNAL]: signal, wait up to 10 s, then SIGKILL
  local pid=$1 sig=${2:-TERM} i
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -"$sig" "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? pids p i
  trap - EXIT INT TERM
  set +e
  stop_pid "$sampler_pid"
  stop_pid "$fio_pid"
  stop_pid "$demo_pid"
  # The lab, as `rebound demo --keep` says (pkill -f DIR), by pid: its
  # machines first told not to run (the node would restart their agents).
  rm -f "$lab"/*/host/*/want-running 2>/dev/null
  pids=$(lab_pids)
  if [[ -n "$pids" ]]; then
    say "stopping the lab: $(echo $pids)"
    for p in $pids; do kill -TERM "$p" 2>/dev/null; done
    for i in $(seq 1 100); do [[ -z "$(lab_pids)" ]] && break; sleep 0.1; done
    for p in $(lab_pids); do kill -KILL "$p" 2>/dev/null; done
  fi
  [[ -n "$restarted_pid" ]] && wait "$restarted_pid" 2>/dev/null
  stop_pid "$export_pid"
  if [[ $ok == 1 && $KEEP != 1 ]]; then
    rm -rf "$work"
  else
    say "work directory kept: $work (logs: $lab/*.log, $work/fio/*.err, samples $work/samples.jsonl)"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 4' INT TERM

event() { printf '%s\n' "$(IFS=$'\t'; echo "$*")" >>"$work/events.tsv"; }
phase_begin() { phase_t0=$(now); }
phase_end() { printf '%s\t%s\t%s\n' "$1" "$phase_t0" "$(now)" >>"$work/phases.tsv"; }

# run_fio NAME URI RUNTIME FIO-ARGS... (foreground unless FIO_BG=1)
run_fio() {
  local name=$1 uri=$2 runtime=$3; shift 3
  local cmd=(fio --name="$name" --ioengine=nbd --uri="$uri" --size="$DISK_SIZE"
             --time_based --runtime="$runtime" --numjobs=1 --percentile_list=50:99:99.9
             --output-format=json "$@")
  printf '%q ' "${cmd[@]}" >"$work/fio/$name.cmd"
  # In the background, so that a signal reaches the trap without waiting.
  "${cmd[@]}" >"$work/fio/$name.json" 2>"$work/fio/$name.err" &
  fio_pid=$!
  [[ ${FIO_BG:-0} == 1 ]] || fio_wait "$name"
}

# fio_wait NAME: wait for the fio run in the background, say how it went
fio_wait() {
  local rc=0
  wait "$fio_pid" || rc=$?
  fio_pid=
  if ((rc != 0)); then
    say "fio $1 FAILED (exit $rc): $(tail -2 "$work/fio/$1.err" | tr '\n' ' ')"
  else
    say "fio $1: $("$py" bench/replication_stats.py fio "$work/fio/$1.json" || echo '?')"
  fi
}

# settle LABEL: wait until the newest point is < 2×RPO old (SETTLE_MAX at most)
settle() {
  local waited st=ok
  waited=$("$py" bench/replication_stats.py wait --rebound "$rebound" --max-age $((2 * RPO_SECS)) --timeout "$SETTLE_MAX") || st=timeout
  say "settle before $1: ${waited}s ($st)"
  event settle "$1" "$waited" "$st"
}

rand_a=(--rw=randwrite --bs=4k --iodepth=16 --rate="$WRITE_RATE")
rand_b=(--rw=randwrite --bs=4k --iodepth=16)
seq_b=(--rw=write --bs=1m --iodepth=4)

# ------------------------------------------------------------------ lab
say "work directory $work; protected machine: rebound demo --keep --rpo-secs $RPO_SECS --disk-size $DISK_SIZE"
"$rebound" demo --keep --dir "$lab" --rpo-secs "$RPO_SECS" --disk-size "$DISK_SIZE" >"$work/demo.log" 2>&1 &
demo_pid=$!
t=0
while kill -0 "$demo_pid" 2>/dev/null; do
  sleep 1; t=$((t + 1))
  if ((t > DEMO_TIMEOUT)); then tail -20 "$work/demo.log" >&2; die "rebound demo did not finish in ${DEMO_TIMEOUT}s"; fi
done
demo_rc=0; wait "$demo_pid" || demo_rc=$?
demo_pid=
if ((demo_rc != 0)); then
  tail -30 "$work/demo.log" >&2
  die "rebound demo failed (exit $demo_rc); its log: $work/demo.log"
fi
demo_secs=$(grep -oP '^timeline: .* in \K[0-9.]+(?= s)' "$work/demo.log" || echo "?")
REBOUND_SERVER=$(grep -oP 'REBOUND_SERVER=\K\S+' "$work/demo.log" | head -1 || true)
REBOUND_TOKEN=$(grep -oP 'REBOUND_TOKEN=\K\S+' "$work/demo.log" | head -1 || true)
[[ -n "$REBOUND_SERVER" && -n "$REBOUND_TOKEN" ]] || { tail -20 "$work/demo.log" >&2; die "the demo printed no REBOUND_SERVER/REBOUND_TOKEN"; }
export REBOUND_SERVER REBOUND_TOKEN
psock="$lab/primary/host/vm1/nbd.sock"
[[ -S "$psock" ]] || die "no NBD socket $psock (the demo's vm1 is not running at the primary site?)"
say "demo done in ${demo_secs}s; server $REBOUND_SERVER"
ps -o pid,args -p "$(lab_pids | paste -sd,)" >"$work/lab-ps.txt" 2>/dev/null || true

# ------------------------------------------------------------------ plain export
truncate -s "$DISK_SIZE" "$plain/disk0"
"$rebound" agent export "$plain/disk0" --listen "unix:$plain/nbd.sock" --state-dir "$plain/state" \
  >"$plain/export.log" 2>&1 </dev/null &
export_pid=$!
for _ in $(seq 1 200); do [[ -S "$plain/nbd.sock" ]] && break; sleep 0.05; done
[[ -S "$plain/nbd.sock" ]] || { cat "$plain/export.log" >&2; die "rebound agent export created no socket"; }

uri_plain="nbd+unix:///disk0?socket=$plain/nbd.sock"
uri_prot="nbd+unix:///disk0?socket=$psock"

"$py" bench/replication_stats.py sample --work "$work" --rebound "$rebound" --item vm1 \
  --out "$work/samples.jsonl" 2>"$work/sampler.err" &
sampler_pid=$!
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

# ------------------------------------------------------------------ (a)
# Every run starts with the lab caught up (newest point < 2×RPO old), the
# plain ones too: the lab is up, idle, during them (no catch-up stealing CPU).
settle a-plain
say "(a) ${WRITE_RATE} 4k random writes, ${DURATION}s: plain"
phase_begin; run_fio a-plain "$uri_plain" "$DURATION" "${rand_a[@]}"; phase_end a-plain
settle a-protected
say "(a) protected"
phase_begin; run_fio a-protected "$uri_prot" "$DURATION" "${rand_a[@]}"; phase_end a-protected

# ------------------------------------------------------------------ (b)
for job in rand4k seq1m; do
  if [[ $job == rand4k ]]; then args=("${rand_b[@]}"); else args=("${seq_b[@]}"); fi
  settle "b-$job-plain"
  say "(b) $job unlimited, ${RATE_SECS}s: plain"
  phase_begin; run_fio "b-$job-plain" "$uri_plain" "$RATE_SECS" "${args[@]}"; phase_end "b-$job-plain"
  settle "b-$job-protected"
  say "(b) $job protected"
  phase_begin; run_fio "b-$job-protected" "$uri_prot" "$RATE_SECS" "${args[@]}"; phase_end "b-$job-protected"
done

# ------------------------------------------------------------------ (c)
settle c-protected
say "(c) ${WRITE_RATE} 4k random writes for ${OUTAGE_RUN}s on the protected machine; recovery node killed at +${OUTAGE_AT}s for ${OUTAGE}s"
phase_begin
c0=$(now)
FIO_BG=1 run_fio c-protected "$uri_prot" "$OUTAGE_RUN" "${rand_a[@]}"
sleep "$OUTAGE_AT"
node_pid=
for p in $(pgrep -f -- "--site recovery" || true); do
  args_s=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null || true)
  if [[ " $args_s" == *" node "* && "$args_s" == *"$lab/"* ]]; then node_pid=$p; fi
done
if [[ -z "$node_pid" ]]; then
  say "no recovery node found among the lab's processes:"; ps -o pid,args -p "$(lab_pids | paste -sd,)" >&2 || true
  event node-missing
else
  mapfile -d '' -t node_argv <"/proc/$node_pid/cmdline"
  mapfile -d '' -t node_env_all <"/proc/$node_pid/environ"
  node_env=()
  for e in "${node_env_all[@]}"; do if [[ $e == *=* ]]; then node_env+=("$e"); fi; done
  node_cwd=$(readlink "/proc/$node_pid/cwd")
  printf '%q ' "${node_argv[@]}" >"$work/recovery-node.cmd"
  say "SIGKILL recovery node pid $node_pid: $(cat "$work/recovery-node.cmd")"
  kill -KILL "$node_pid"
  kill_t=$(now)
  event node-killed "$kill_t" "$node_pid"
  for _ in $(seq 1 100); do kill -0 "$node_pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$node_pid" 2>/dev/null; then say "warning: pid $node_pid still exists 10 s after SIGKILL"; fi
  sleep "$(awk -v k="$kill_t" -v n="$(now)" -v o="$OUTAGE" 'BEGIN { r = k + o - n; if (r < 0) r = 0; printf "%.3f", r }')"
  (cd "$node_cwd" && exec env -i "${node_env[@]}" "${node_argv[@]}") \
    >>"$lab/node-recovery.bench-restart.log" 2>&1 </dev/null &
  restarted_pid=$!
  restart_t=$(date +%s)
  event node-restarted "$(now)" "$restarted_pid"
  say "recovery node restarted: pid $restarted_pid (log $lab/node-recovery.bench-restart.log)"
fi
fio_wait c-protected
phase_end c-protected
if [[ -n "$node_pid" ]]; then
  left=$(( CATCHUP_MAX - ( $(date +%s) - restart_t ) ))
  ((left > 0)) || left=1
  say "waiting up to ${left}s for the newest point to be < $((2 * RPO_SECS))s old (catch-up)"
  phase_begin
  w=$("$py" bench/replication_stats.py wait --rebound "$rebound" --max-age $((2 * RPO_SECS)) --timeout "$left") || true
  sleep 2  # one more sample for the report
  phase_end c-catchup
  if ! kill -0 "$restarted_pid" 2>/dev/null; then say "warning: the restarted recovery node (pid $restarted_pid) has exited; see its log"; fi
fi

stop_pid "$sampler_pid"; sampler_pid=
load_end=$(cut -d' ' -f1-3 /proc/loadavg)

# ------------------------------------------------------------------ report
fs=$(findmnt -n -o FSTYPE -T "$work" 2>/dev/null || stat -f -c %T "$work" 2>/dev/null || echo "?")
dev=$(df -P "$work" | awk 'NR==2 {print $1}')
alloc_plain=$(du -k "$plain/disk0" | cut -f1)
alloc_prot=$(du -k "$lab/primary/host/vm1/disks/disk0.img" 2>/dev/null | cut -f1 || echo "?")
header="repo at commit $commit; binary $bin_note"
header+="\\n$(nproc) CPUs, $(uname -r); load average at start $load_start, at end $load_end"
header+="\\nfio: $engine; no ramp; --size=$DISK_SIZE"
header+="\\nplain: rebound agent export of a fresh sparse raw $DISK_SIZE file (dirty tracking on), run while the lab is up and idle"
header+="\\nprotected: vm1 (disk0) of rebound demo --keep --rpo-secs $RPO_SECS --disk-size $DISK_SIZE (demo took ${demo_secs}s), replicating primary → recovery"
header+="\\npage cache: warm, no drop_caches; both disks are sparse raw files on the same $fs filesystem ($dev); allocated at the end: plain ${alloc_plain} KiB, protected disk0 ${alloc_prot} KiB"
header+="\\nrecovery point age = sample time − newest point's time; every run starts after a wait for it to be < 2×RPO = $((2 * RPO_SECS)) s (also the catch-up threshold)"
"$py" bench/replication_stats.py report --work "$work" --rpo-secs "$RPO_SECS" --duration "$DURATION" \
  --rate-secs "$RATE_SECS" --outage "$OUTAGE" --write-rate "$WRITE_RATE" --header "$header" | tee "$work/summary.txt"
echo
echo "lab processes after the demo:"
sed 's/^/  /' "$work/lab-ps.txt"
[[ -s "$work/sampler.err" ]] && { echo "sampler stderr:"; tail -5 "$work/sampler.err"; }
ok=1

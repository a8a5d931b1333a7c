#!/usr/bin/env bash
# CI against a real SLURM: a one-node cluster on loopback (Debian's slurm-wlm + munge, started by
# .ci/slurm-cluster.sh under a temporary directory), the job scripts of jobs/ submitted with
# `sbatch --wait`, and the HDF5 outputs checked with h5py:
#   A  jobs/single-node.sbatch, 2 ranks, srun --mpi=pmi2
#   B  jobs/nu-sweep.sbatch as an array over nu in {0,1,2}, one output directory per task
#   C  jobs/multi-node.sbatch squeezed onto the one node (-N 1, 2 ranks), mpiexec inside the allocation
#   D  the pitfall: srun without an MPI plugin (P size-1 worlds) must fail with exit 2 and a message
#   E  --time=00:02:00 --signal=B:USR1@60 with more rounds than fit: signalled, checkpointed,
#      requeued (scontrol requeue), resumed, finished; the final model must equal (bit for bit) an
#      uninterrupted run of the same config launched with mpiexec directly, the metrics must hold
#      every round exactly once, and SLURM must show a restart.
# Needs root (it starts daemons) and apt (or the packages already installed); otherwise it prints
# "SKIPPED: ..." and exits 0. Exits 1 if any check fails. The daemons it started are stopped on
# every exit (trap). Knobs: SLURM_CI_KEEP=1 keeps the temporary directory; SLURM_CI_TARGET_S (90):
# seconds of training the time-limited job needs (calibrated from a short run on this machine).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
T0=$(date +%s)
log() { echo "[slurm-ci +$(($(date +%s) - T0))s $(date +%T)] $*"; }

if [ "$(id -u)" != 0 ]; then
  echo "SKIPPED: the SLURM CI needs root to start slurmctld/slurmd/munged (uid $(id -u))"
  exit 0
fi

# --- the venv the jobs use on the "compute node" (this machine) ----------------------------------
VENV=${MPIFEDMETA_VENV:-${VIRTUAL_ENV:-}}
if [ -z "$VENV" ] && [ -x "$REPO/.venv/bin/mpifedmeta" ]; then VENV=$REPO/.venv; fi
if [ -z "$VENV" ] || [ ! -x "$VENV/bin/mpifedmeta" ]; then
  echo "FAILED: no venv with mpifedmeta: activate one, or set MPIFEDMETA_VENV (.ci/run creates .venv)"
  exit 1
fi
VENV=$(cd "$VENV" && pwd)
set +u
# shellcheck disable=SC1091
. "$VENV/bin/activate"
set -u
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
unset MPIFEDMETA_INJECT_FAILURE MPIFEDMETA_LAUNCH MPIFEDMETA_SRUN_MPI MPIFEDMETA_OUT MPIFEDMETA_NUS \
      MPIFEDMETA_METAGRADS MPIFEDMETA_SEEDS MPIFEDMETA_DEVICE MPIFEDMETA_DRY_RUN SBATCH_PARTITION \
      SBATCH_ACCOUNT SBATCH_TIMELIMIT SBATCH_GPUS_PER_TASK SBATCH_SIGNAL
# shellcheck disable=SC2046
unset $(compgen -e | grep -E '^(SLURM|SBATCH|SRUN)_')   # nothing from an outer allocation leaks in

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mpifedmeta-slurm-ci.XXXXXX")
chmod 755 "$WORK"
CLUSTER=$WORK/cluster
mkdir -p "$WORK/logs" "$WORK/out"
BG_PIDS=()
FAILED=()

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local p
  for p in "${BG_PIDS[@]}"; do   # the background helpers and their children (timeout -> mpiexec, sbatch)
    kill $(pgrep -P "$p" 2>/dev/null) "$p" 2>/dev/null
  done
  if [ "$rc" != 0 ] || [ ${#FAILED[@]} -gt 0 ]; then
    if [ -f "$CLUSTER/etc/slurm.conf" ]; then bash "$REPO/.ci/slurm-cluster.sh" logs "$CLUSTER"; fi
  fi
  bash "$REPO/.ci/slurm-cluster.sh" stop "$CLUSTER"
  if [ "${SLURM_CI_KEEP:-0}" = 1 ] || { [ "$rc" != 0 ] && [ "$rc" != 77 ]; }; then
    echo "[slurm-ci] outputs and logs kept in $WORK"
  else
    rm -rf "$WORK"
  fi
  [ "$rc" = 77 ] && rc=0
  log "wall time $(($(date +%s) - T0)) s, exit $rc"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

check() {   # check NAME COMMAND...: run COMMAND, record NAME as failed if it fails
  local name=$1; shift
  if "$@"; then log "ok: $name"; else log "FAILED: $name"; FAILED+=("$name"); fi
}

# --- the cluster ---------------------------------------------------------------------------------
log "starting a one-node SLURM cluster in $CLUSTER"
bash "$REPO/.ci/slurm-cluster.sh" start "$CLUSTER"
rc=$?
if [ "$rc" = 77 ]; then exit 77; fi   # SKIPPED (message printed by the helper)
if [ "$rc" != 0 ]; then log "FAILED: the cluster did not start"; exit 1; fi
export SLURM_CONF=$CLUSTER/etc/slurm.conf
export PATH=$PATH:/usr/sbin:/sbin

# --- the checker (python + h5py) -----------------------------------------------------------------
cat >"$WORK/check.py" <<'PY'
"""check.py run OUT ROUNDS [key=value ...] | same OUT REF | restarts JOBID | calib OUT"""
import json
import os
import sys

import h5py
import numpy as np


def latest_checkpoint(out):
    names = sorted(n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith("round_") and n.endswith(".h5"))
    return os.path.join(out, "checkpoints", names[-1])


def params(path):
    with h5py.File(path, "r") as f:
        return int(f.attrs["round"]), {k: f["model"][k][()] for k in f["model"]}


def run(out, rounds, *expect):
    rounds = int(rounds)
    ok = True
    with h5py.File(os.path.join(out, "metrics.h5"), "r") as f:
        cfg = json.loads(f.attrs["config"])
        r = f["train/round"][()]
        e = f["eval/round"][()]
        lens = {k: f["train"][k].shape[0] for k in f["train"]}
    if not np.array_equal(r, np.arange(1, rounds + 1)):
        dup = len(r) - len(np.unique(r))
        print(f"  {out}: train/round is not 1..{rounds}: {len(r)} rows, {dup} duplicated, first {r[:5]}, last {r[-5:]}")
        ok = False
    if len(set(lens.values())) != 1:
        print(f"  {out}: train columns of different lengths {lens}")
        ok = False
    if len(e) == 0 or e[0] != 0 or np.any(np.diff(e) <= 0) or e[-1] != rounds:
        print(f"  {out}: eval/round not strictly increasing from 0 to {rounds}: {e}")
        ok = False
    ck_round, _ = params(latest_checkpoint(out))
    if ck_round != rounds:
        print(f"  {out}: latest checkpoint is round {ck_round}, not {rounds}")
        ok = False
    with h5py.File(os.path.join(out, "metrics.h5"), "r") as f:
        attrs = dict(f.attrs)
    for kv in expect:
        key, want = kv.split("=", 1)
        sec, name = key.split(".")
        got = attrs.get(name) if sec == "attr" else cfg[sec][name]
        if str(got) != want:
            print(f"  {out}: config {key} = {got!r}, expected {want}")
            ok = False
    print(f"  {out}: {len(r)} train rows (rounds {r[0] if len(r) else '-'}..{r[-1] if len(r) else '-'}), "
          f"eval rounds {e.tolist()}, checkpoint round {ck_round}, nu={cfg['train']['nu']}, "
          f"{attrs.get('world_size_at_start', '?')} rank(s)")
    return ok


def same(out, ref):
    (ra, a), (rb, b) = params(latest_checkpoint(out)), params(latest_checkpoint(ref))
    ok = ra == rb and sorted(a) == sorted(b)
    diff = []
    for k in sorted(a):
        if k not in b or a[k].shape != b[k].shape or not np.array_equal(a[k], b[k]):
            diff.append(k)
    ok = ok and not diff
    with h5py.File(os.path.join(out, "metrics.h5"), "r") as fa, h5py.File(os.path.join(ref, "metrics.h5"), "r") as fb:
        for name in ("train/round", "train/meta_loss", "eval/round", "eval/train_acc_mean", "eval/holdout_acc_mean"):
            if name in fa and name in fb and not np.array_equal(fa[name][()], fb[name][()]):
                diff.append(name)
                ok = False
    n = sum(v.size for v in a.values())
    print(f"  final models at round {ra} vs {rb}: {len(a)} tensors, {n} parameters, "
          + ("bit-identical; meta-loss and eval rows identical" if ok else f"DIFFER in {diff}"))
    return ok


def calib(out):
    with h5py.File(os.path.join(out, "metrics.h5"), "r") as f:
        t = f["train/round_time"][()]
    print(float(np.median(t[2:] if len(t) > 4 else t)))
    return True


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    sys.exit(0 if {"run": run, "same": same, "calib": calib}[mode](*args) else 1)
PY
checkpy() { python "$WORK/check.py" "$@"; }

# job state of JOBID as "STATE restarts=N exit=X" (kept by slurmctld for MinJobAge=600 s)
job_state() {
  scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' \
    | awk -F= '$1=="JobState"{s=$2} $1=="Restarts"{r=$2} $1=="ExitCode"{x=$2} $1=="Reason"{why=$2}
               END{printf "%s restarts=%s exit=%s reason=%s\n", s, r, x, why}'
}
restarts_of() { scontrol show job -o "$1" 2>/dev/null | grep -o 'Restarts=[0-9]*' | head -n 1 | cut -d= -f2; }

submit() {   # submit NAME EXPECTED_RC SBATCH_ARGS...: sbatch --wait in the background
  local name=$1 want=$2; shift 2
  log "submit $name: sbatch --wait $*"
  (
    timeout -k 10 "${SUBMIT_TIMEOUT:-600}" sbatch --parsable --wait "$@" >"$WORK/$name.jid" 2>"$WORK/$name.sbatch.err"
    echo $? >"$WORK/$name.rc"
  ) &
  BG_PIDS+=($!)
  echo "$!" >"$WORK/$name.pid"
  echo "$want" >"$WORK/$name.want"
}

wait_submitted() {   # wait_submitted NAME: wait for its sbatch --wait, check the exit code
  local name=$1 pid rc want jid
  pid=$(cat "$WORK/$name.pid")
  wait "$pid"
  rc=$(cat "$WORK/$name.rc" 2>/dev/null || echo "?")
  want=$(cat "$WORK/$name.want")
  jid=$(head -n 1 "$WORK/$name.jid" 2>/dev/null | cut -d';' -f1)
  log "$name: job ${jid:-?} ended, sbatch --wait exit $rc (expected $want): $(job_state "${jid:-0}")"
  if [ -s "$WORK/$name.sbatch.err" ]; then sed 's/^/    sbatch: /' "$WORK/$name.sbatch.err"; fi
  [ "$rc" = "$want" ]
}

show_log() { local f; for f in "$@"; do echo "----- $f"; sed 's/^/    /' "$f"; done; }

EXPORT="ALL,MPIFEDMETA_VENV=$VENV"
QS=configs/quickstart.toml
COMMON=(--set train.threads=1 --set train.strategy=vmap)

# --- calibration: seconds per round of the time-limited job's config on this machine -------------
# E must not be able to finish before its first warning signal (which comes 30-60 s after the
# start), so it gets about SLURM_CI_TARGET_S seconds of training at the measured speed.
TL_SETS=(--set eval.every=50 --set output.checkpoint_every=25 --set output.progress_every=25)
log "calibration: 12 rounds with mpiexec -n 2"
if ! timeout -k 10 300 mpiexec -n 2 mpifedmeta run "$QS" "${COMMON[@]}" "${TL_SETS[@]}" --set train.rounds=12 \
     --set "output.dir=$WORK/out/calib" >"$WORK/logs/calib.log" 2>&1; then
  show_log "$WORK/logs/calib.log"; log "FAILED: the calibration run"; exit 1
fi
SPR=$(checkpy calib "$WORK/out/calib")
TARGET=${SLURM_CI_TARGET_S:-90}
TL_ROUNDS=$(python -c "import math; print(min(5000, max(120, math.ceil($TARGET / max($SPR, 1e-3)))))")
log "calibration: $(printf '%.3f' "$SPR") s/round -> the time-limited job gets $TL_ROUNDS rounds (~$TARGET s of training)"

start_reference() {   # start_reference ROUNDS: the uninterrupted run of E's config, mpiexec -n 2, background
  REF_DIR=$WORK/out/reference-$1
  log "reference: uninterrupted run of the time-limited job's config, mpiexec -n 2, $1 rounds"
  REF_T0=$(date +%s)
  ( timeout -k 10 900 mpiexec -n 2 mpifedmeta run "$QS" "${COMMON[@]}" "${TL_SETS[@]}" --set "train.rounds=$1" \
      --set "output.dir=$REF_DIR" >"$WORK/logs/reference-$1.log" 2>&1; echo $? >"$WORK/reference-$1.rc" ) &
  REF_PID=$!
  BG_PIDS+=("$REF_PID")
}
wait_reference() {   # wait_reference ROUNDS
  wait "$REF_PID"
  local rc
  rc=$(cat "$WORK/reference-$1.rc" 2>/dev/null || echo "?")
  log "reference run ($1 rounds) ended with exit $rc after $(($(date +%s) - REF_T0)) s"
  tail -n 1 "$WORK/logs/reference-$1.log" | sed 's/^/    /'
  [ "$rc" = 0 ] || show_log "$WORK/logs/reference-$1.log"
  [ "$rc" = 0 ]
}

# --- A-D and the reference run, all at once (SLURM queues A-D on its CPUs) -----------------------
submit A 0 --export="$EXPORT" --ntasks=2 --time=00:10:00 -o "$WORK/logs/A-single-%j.out" \
  jobs/single-node.sbatch "$QS" "${COMMON[@]}" --set train.rounds=6 --set eval.every=3 --set "output.dir=$WORK/out/single"
submit B 0 --export="$EXPORT,MPIFEDMETA_NUS=0 1 2,MPIFEDMETA_OUT=$WORK/out/sweep" --array=0-2 --ntasks=1 --time=00:10:00 \
  -o "$WORK/logs/B-sweep-%A_%a.out" jobs/nu-sweep.sbatch "$QS" "${COMMON[@]}" --set train.rounds=4 --set eval.every=2
submit C 0 --export="$EXPORT,MPIFEDMETA_LAUNCH=mpiexec,MPIFEDMETA_OUT=$WORK/out/multi" -N 1 --ntasks-per-node=2 \
  --time=00:10:00 -o "$WORK/logs/C-multi-%j.out" jobs/multi-node.sbatch "$QS" "${COMMON[@]}" --set train.rounds=4 --set eval.every=2
submit D 2 --export="$EXPORT,MPIFEDMETA_SRUN_MPI=none" --ntasks=2 --time=00:10:00 -o "$WORK/logs/D-nompi-%j.out" \
  jobs/single-node.sbatch "$QS" --set train.rounds=2 --set "output.dir=$WORK/out/nompi"
start_reference "$TL_ROUNDS"

check "A single-node job (2 ranks, srun --mpi=pmi2) exits 0" wait_submitted A
check "A outputs: rounds 1..6 once each, 2 ranks" checkpy run "$WORK/out/single" 6 attr.world_size_at_start=2
check "B nu-sweep array (3 tasks) exits 0" wait_submitted B
for nu in 0 1 2; do
  check "B task nu=$nu: own output directory, rounds 1..4" checkpy run "$WORK/out/sweep/nu$nu" 4 "train.nu=$nu"
done
check "C multi-node script (-N 1, 2 ranks, mpiexec) exits 0" wait_submitted C
check "C outputs: rounds 1..4, 2 ranks" checkpy run "$WORK/out/multi" 4 attr.world_size_at_start=2
check "D srun without MPI plugin exits 2" wait_submitted D
check "D log explains the size-1 worlds" grep -q "MPI sees a world of size 1" "$WORK"/logs/D-nompi-*.out
D_JID=$(head -n 1 "$WORK/D.jid" | cut -d';' -f1)
check "D was not requeued" test "$(restarts_of "$D_JID")" = 0
show_log "$WORK"/logs/A-single-*.out "$WORK"/logs/B-sweep-*_1.out "$WORK"/logs/C-multi-*.out "$WORK"/logs/D-nompi-*.out
check "reference run exits 0" wait_reference "$TL_ROUNDS"

# --- E: the time-limited job: signal, checkpoint, requeue, resume, finish ------------------------
run_E() {   # run_E NAME ROUNDS
  local name=$1 rounds=$2
  E_DIR=$WORK/out/timelimit-$rounds
  TIMELINE=$WORK/$name.timeline
  : >"$TIMELINE"
  stamp() { echo "$(date '+%H:%M:%S') $*" >>"$TIMELINE"; }
  stamp "CI    submit: sbatch --wait --time=00:02:00 --signal=B:USR1@60 --requeue --open-mode=append ($rounds rounds)"
  E_T0=$(date +%s)
  SUBMIT_TIMEOUT=900 submit "$name" 0 --export="$EXPORT,MPIFEDMETA_OUT=$E_DIR" --ntasks=2 \
    --time=00:02:00 --signal=B:USR1@60 --requeue --open-mode=append -J mfm-timelimit \
    -o "$WORK/logs/$name-timelimit-%j.out" jobs/single-node.sbatch "$QS" "${COMMON[@]}" "${TL_SETS[@]}" --set "train.rounds=$rounds"
  # watch the job in SLURM: RUNNING -> PENDING (requeued, BeginTime) -> RUNNING -> ... -> COMPLETED
  (
    jid="" last=""
    while :; do
      [ -n "$jid" ] || jid=$(head -n 1 "$WORK/$name.jid" 2>/dev/null | cut -d';' -f1)
      if [ -n "$jid" ]; then
        st=$(job_state "$jid")
        if [ "$st" != "$last" ]; then stamp "SLURM job $jid: $st"; last=$st; fi
        case $st in COMPLETED* | FAILED* | CANCELLED* | TIMEOUT* | NODE_FAIL* | OUT_OF_MEMORY*) break ;; esac
      fi
      sleep 1
    done
  ) &
  local watch=$!
  BG_PIDS+=("$watch")
  wait_submitted "$name"
  local ok=$?
  sleep 1; kill "$watch" 2>/dev/null; wait "$watch" 2>/dev/null
  E_JID=$(head -n 1 "$WORK/$name.jid" | cut -d';' -f1)
  E_LOG=$(ls "$WORK"/logs/"$name"-timelimit-*.out 2>/dev/null | head -n 1)
  E_RESTARTS=$(restarts_of "$E_JID")
  log "$name: job $E_JID took $(($(date +%s) - E_T0)) s, restarts ${E_RESTARTS:-?}"
  return $ok
}

print_timeline() {   # the watcher's SLURM states + the job's own stamped lines (+ rank 0's lines)
  python - "$TIMELINE" "$E_LOG" <<'PY'
import re, sys
timeline, log = sys.argv[1], sys.argv[2]
events = [(l[:8], 0, l[9:].rstrip()) for l in open(timeline) if l.strip()]
lines = open(log, errors="replace").read().splitlines()
stamped = []   # (index, time)
for i, line in enumerate(lines):
    m = re.match(r"\[mpifedmeta-job\] \d{4}-\d\d-\d\dT(\d\d:\d\d:\d\d) (.*)", line)
    if m:
        stamped.append((i, m.group(1)))
        if not m.group(2).startswith("launch:"):
            events.append((m.group(1), 1, "job   " + m.group(2)))
for i, line in enumerate(lines):
    if not re.search(r"stop requested|resuming|dropped|done:|DUE TO|error", line) or line.startswith("[mpifedmeta-job]"):
        continue
    before = [t for j, t in stamped if j < i]
    after = [t for j, t in stamped if j > i]
    # rank 0's lines carry no time: "resuming" follows a start line, the others precede the step's
    # exit; slurmstepd's lines name their own time
    m = re.search(r" AT \d{4}-\d\d-\d\dT(\d\d:\d\d:\d\d)", line)
    if m:
        events.append((m.group(1), 2, "slurm " + line.strip()))
        continue
    t = (before[-1] if before else "?") if "resuming" in line else (after[0] if after else "?")
    events.append((t, 2, "rank0 " + ("after " if "resuming" in line else "by ") + line.strip()))
print("\n===== timeline of the time-limited job =====")
for t, _, what in sorted(events, key=lambda e: (e[0], e[1])):
    print(f"  {t}  {what}")
print("============================================\n")
PY
}

E_ROUNDS=$TL_ROUNDS
check "E time-limited job ends with exit 0 after its requeues" run_E E "$E_ROUNDS"
if [ "${E_RESTARTS:-0}" = 0 ] && [ ${#FAILED[@]} = 0 ]; then
  # finished before its first warning: this machine got faster than the calibration said. Once
  # more with 3x the rounds (and a matching reference run).
  show_log "$E_LOG"
  log "E finished before the time-limit warning (no requeue): retrying with 3x the rounds"
  E_ROUNDS=$((3 * TL_ROUNDS))
  start_reference "$E_ROUNDS"
  check "E2 time-limited job ends with exit 0 after its requeues" run_E E2 "$E_ROUNDS"
  check "reference run ($E_ROUNDS rounds) exits 0" wait_reference "$E_ROUNDS"
fi
show_log "$E_LOG"
print_timeline

check "E: SLURM shows at least one requeue (Restarts=${E_RESTARTS:-?})" test "${E_RESTARTS:-0}" -ge 1
check "E: the job log shows SLURM_RESTART_COUNT=$E_RESTARTS on the last start" \
  grep -Eq "\] [0-9T:-]+ start: job $E_JID restart ${E_RESTARTS:-x} " "$E_LOG"
check "E: the warning signal reached the job" grep -q "signal USR1 received" "$E_LOG"
check "E: the ranks checkpointed and exited 3" grep -q "step exited with code 3" "$E_LOG"
check "E: scontrol requeue after the checkpoint" grep -q "checkpointed (stopped by a signal): requeue $E_JID" "$E_LOG"
check "E: the requeued run resumed from the checkpoint" grep -q "resuming .* at round [1-9]" "$E_LOG"
check "E: the last run finished and did not requeue" grep -q "finished: all rounds done (no requeue)" "$E_LOG"
check "E: outputs: rounds 1..$E_ROUNDS, each exactly once" checkpy run "$E_DIR" "$E_ROUNDS" attr.world_size_at_start=2
check "reference outputs: rounds 1..$E_ROUNDS" checkpy run "$REF_DIR" "$E_ROUNDS"
check "E: final model bit-identical to the uninterrupted reference" checkpy same "$E_DIR" "$REF_DIR"

# what a user does after an array job
check "mpifedmeta report over the sweep" mpifedmeta report "$WORK"/out/sweep/nu0 "$WORK"/out/sweep/nu1 \
  "$WORK"/out/sweep/nu2 --out "$WORK/out/sweep-report"

echo
echo "jobs:"
for name in A B C D E E2; do
  [ -f "$WORK/$name.jid" ] || continue
  jid=$(head -n 1 "$WORK/$name.jid" | cut -d';' -f1)
  echo "  $name: job $jid, sbatch --wait exit $(cat "$WORK/$name.rc" 2>/dev/null), $(job_state "$jid")"
done
if [ ${#FAILED[@]} -gt 0 ]; then
  log "SLURM CI FAILED: ${#FAILED[@]} check(s): ${FAILED[*]}"
  exit 1
fi
log "SLURM CI passed"
exit 0

#!/usr/bin/env bash
# CI across TWO nodes: a two-node SLURM cluster on this machine (.ci/slurm-two-nodes.sh: one network +
# UTS namespace per node, one slurmd each), the job scripts of jobs/ submitted across both, and the
# outputs compared bit for bit with a one-node run of the same configuration (benchmarks/compare_runs.py):
#   M2  jobs/multi-node.sbatch -N 2 --ntasks-per-node=1, srun --mpi=pmi2; `mpifedmeta info` in the job
#       shows node1 and node2, a node-local rank 0 on each; node2's veth byte counters during the job
#   M3  the same with --ntasks-per-node=2 (local ranks 0 and 1 on each node)
#   M4  -N 2 --ntasks-per-node=1 with MPIFEDMETA_LAUNCH=mpiexec (hydra inside the allocation)
#   M5  no SLURM: `mpiexec -launcher ssh -launcher-exec node-ssh -hosts node1,node2` started on node1
#   F   scancel --signal=USR1 while a 2 x 1 job trains: the tasks of both nodes checkpoint (exit 3), the
#       job requeues, resumes and ends bit-identical to an uninterrupted run
#   E   --time=00:01:00 --signal=B:USR1@30 with more rounds than fit: several requeues, then done,
#       bit-identical
#   K   kill -9 of the rank on node2 (srun): the whole job ends within seconds, its log names node2;
#       before that, L: a job on node2 writing the same output directory is refused (exit 2, the lock
#       holder's host and PID)
#   K2  the same kill under hydra (MPIFEDMETA_LAUNCH=mpiexec)
# Needs root (daemons, namespaces) and apt (or the packages installed); otherwise it prints
# "SKIPPED: ..." and exits 0. Exits 1 if any check fails. Everything it started (daemons, namespaces,
# veths, bridge, job processes) is removed on every exit (trap), and that nothing is left is checked.
# Knobs: MULTINODE_CI_KEEP=1 keeps the temporary directory; MULTINODE_CI_TARGET_S (60): seconds of
# training the time-limited job needs at the speed measured at the start (each segment trains ~20-25 s:
# SLURM's warning comes at its first 30-s tick after the start, the job forwards it once the step is
# MPIFEDMETA_SIGNAL_GRACE = 30 s old, the ranks start in 5-10 s; so 60 s means at least 2 requeues).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
T0=$(date +%s)
log() { echo "[2node-ci +$(($(date +%s) - T0))s $(date +%T)] $*"; }

if [ "$(id -u)" != 0 ]; then
  echo "SKIPPED: the two-node CI needs root to start slurmctld/slurmd/munged and network namespaces (uid $(id -u))"
  exit 0
fi

# --- the venv the jobs use (shared by both "nodes": they share this machine's file systems) ----------
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
      MPIFEDMETA_METAGRADS MPIFEDMETA_SEEDS MPIFEDMETA_DEVICE MPIFEDMETA_DRY_RUN MPIFEDMETA_INFO \
      MPIR_CVAR_CH4_NETMOD UCX_TLS SBATCH_PARTITION SBATCH_ACCOUNT SBATCH_TIMELIMIT SBATCH_GPUS_PER_TASK SBATCH_SIGNAL
# shellcheck disable=SC2046
unset $(compgen -e | grep -E '^(SLURM|SBATCH|SRUN)_')   # nothing from an outer allocation leaks in

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mpifedmeta-2node-ci.XXXXXX")
chmod 755 "$WORK"
CL=$WORK/cluster
mkdir -p "$WORK/logs" "$WORK/out" "$WORK/res"
CLUSTER_SH=$REPO/.ci/slurm-two-nodes.sh
CHECK=$REPO/.ci/multinode_check.py
BG_PIDS=()

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local p
  for p in "${BG_PIDS[@]}"; do   # background scenarios and their children (timeout -> sbatch, mpiexec)
    pkill -TERM -P "$p" 2>/dev/null
    kill -TERM "$p" 2>/dev/null
  done
  if [ "$rc" != 0 ] || [ -s "$WORK/res/failed" ]; then
    [ -f "$CL/etc/slurm.conf" ] && bash "$CLUSTER_SH" logs "$CL"
  fi
  local env_copy=""
  [ -f "$CL/env" ] && env_copy=$(cat "$CL/env")
  bash "$CLUSTER_SH" stop "$CL" || rc=1
  # nothing of ours is left: namespaces, links, daemons (names from the cluster's env file)
  local left=""
  if [ -n "$env_copy" ]; then
    local NS1="" NS2="" BRIDGE="" VETH1="" VETH2=""
    eval "$env_copy"
    for p in $NS1 $NS2; do ip netns list 2>/dev/null | grep -qw "$p" && left+=" netns $p"; done
    for p in $BRIDGE $VETH1 $VETH2; do ip link show "$p" >/dev/null 2>&1 && left+=" link $p"; done
  fi
  pgrep -f "slurm(ctld|d) -f $CL/" >/dev/null 2>&1 && left+=" slurm daemons"
  pgrep -f "munged.*$CL/" >/dev/null 2>&1 && left+=" munged"
  if [ -n "$left" ]; then
    log "FAILED: teardown left:$left"; rc=1
  elif [ -n "$env_copy" ]; then
    log "teardown: no namespace, veth, bridge or daemon of this cluster is left (ip netns list: $(ip netns list 2>/dev/null | wc -l) namespaces)"
  fi
  if [ "${MULTINODE_CI_KEEP:-0}" = 1 ] || { [ "$rc" != 0 ] && [ "$rc" != 77 ]; }; then
    echo "[2node-ci] outputs and logs kept in $WORK"
  else
    rm -rf "$WORK"
  fi
  [ "$rc" = 77 ] && rc=0
  log "two-node CI: wall time $(($(date +%s) - T0)) s, exit $rc"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# check NAME COMMAND...: run it, print ok/FAILED with its duration; failures go to res/failed
check() {
  local name=$1 t=$SECONDS; shift
  if "$@"; then
    log "ok: $name ($((SECONDS - t)) s)"
  else
    log "FAILED: $name ($((SECONDS - t)) s)"
    echo "$name" >>"$WORK/res/failed"
  fi
}
checkpy() { python "$CHECK" "$@"; }
same() { python "$REPO/benchmarks/compare_runs.py" "$@" | sed 's/^/  /'; return "${PIPESTATUS[0]}"; }
show_log() { local f; for f in "$@"; do echo "----- $f"; sed 's/^/    /' "$f"; done; }

job_state() {   # job_state JID -> "STATE restarts=N exit=X"
  scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' \
    | awk -F= '$1=="JobState"{s=$2} $1=="Restarts"{r=$2} $1=="ExitCode"{x=$2} END{printf "%s restarts=%s exit=%s\n", s, r, x}'
}
restarts_of() { scontrol show job -o "$1" 2>/dev/null | grep -o 'Restarts=[0-9]*' | head -n 1 | cut -d= -f2; }

# sbatch_wait NAME SBATCH_ARGS...: submit, then poll SLURM every 0.5 s until the job is over (sbatch
# --wait polls with a growing interval and returns up to ~25 s late); a requeued job goes back to
# PENDING and is waited for again. NAME.jid, NAME.rc (the batch script's exit code, as sbatch --wait
# returns it), NAME.secs, and NAME.timeline (every change of state, with its time).
sbatch_wait() {
  local name=$1 t=$SECONDS jid st last="" code sig i; shift
  log "submit $name: sbatch $*"
  if ! sbatch --parsable "$@" >"$WORK/res/$name.jid" 2>"$WORK/res/$name.err"; then
    echo 1 >"$WORK/res/$name.rc"; echo 0 >"$WORK/res/$name.secs"
    log "$name: sbatch failed: $(cat "$WORK/res/$name.err")"; return 0
  fi
  jid=$(jid_of "$name")
  for ((i = 0; i < ${SUBMIT_TIMEOUT:-300} * 2; i++)); do
    st=$(job_state "$jid")
    if [ "$st" != "$last" ]; then echo "  $(date +%T) SLURM job $jid: $st" >>"$WORK/res/$name.timeline"; last=$st; fi
    case $st in COMPLETED* | FAILED* | CANCELLED* | TIMEOUT* | NODE_FAIL* | PREEMPTED* | BOOT_FAIL* | DEADLINE* | OUT_OF_MEMORY*) break ;; esac
    sleep 0.5
  done
  case $st in
    COMPLETED* | FAILED* | CANCELLED* | TIMEOUT* | NODE_FAIL* | PREEMPTED* | BOOT_FAIL* | DEADLINE* | OUT_OF_MEMORY*)
      code=$(scontrol show job -o "$jid" | grep -o ' ExitCode=[0-9]*:[0-9]*' | cut -d= -f2)
      sig=${code#*:} code=${code%:*}
      [ "${sig:-0}" != 0 ] && code=$((128 + sig))
      echo "${code:-1}" >"$WORK/res/$name.rc" ;;
    *) scancel "$jid" 2>/dev/null; echo 124 >"$WORK/res/$name.rc"; log "$name: job $jid still not over after ${SUBMIT_TIMEOUT:-300} s: cancelled" ;;
  esac
  echo $((SECONDS - t)) >"$WORK/res/$name.secs"
  log "$name: job $jid over after $((SECONDS - t)) s, exit code $(rc_of "$name"): $st"
  return 0
}
jid_of() { head -n 1 "$WORK/res/$1.jid" 2>/dev/null | cut -d';' -f1; }
rc_of() { cat "$WORK/res/$1.rc" 2>/dev/null || echo "?"; }

# mpifedmeta processes of job JID on NODE (its network namespace holds only this cluster's processes)
job_ranks() {   # job_ranks JID NODE
  local ns p
  ns=$(eval echo "\$NS${2#node}")
  for p in $(ip netns pids "$ns" 2>/dev/null); do
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = mpifedmeta ] || continue
    tr '\0' '\n' 2>/dev/null <"/proc/$p/environ" | grep -qx "SLURM_JOB_ID=$1" && echo "$p"
  done
}
wait_for_checkpoint() {   # wait_for_checkpoint DIR MIN_ROUND SECONDS: a checkpoint of round >= MIN_ROUND
  local i f
  for ((i = 0; i < $3 * 5; i++)); do
    for f in "$1"/checkpoints/round_*.h5; do
      [ -e "$f" ] || continue
      f=${f##*/round_}; f=${f%.h5}
      [ $((10#$f)) -ge "$2" ] && return 0
    done
    sleep 0.2
  done
  return 1
}
veth_bytes() {   # rx + tx bytes of node2's veth (its end on the bridge)
  echo $(( $(cat "/sys/class/net/$VETH2/statistics/rx_bytes") + $(cat "/sys/class/net/$VETH2/statistics/tx_bytes") ))
}

# --- the cluster ---------------------------------------------------------------------------------------
log "starting a two-node SLURM cluster in $CL"
bash "$CLUSTER_SH" start "$CL"
rc=$?
if [ "$rc" = 77 ]; then exit 77; fi
if [ "$rc" != 0 ]; then log "FAILED: the two-node cluster did not start"; exit 1; fi
export SLURM_CONF=$CL/etc/slurm.conf
export PATH=$PATH:/usr/sbin:/sbin
# shellcheck disable=SC1091
. "$CL/env"
EXPORT="ALL,MPIFEDMETA_VENV=$VENV"
QS=configs/quickstart.toml
COMMON=(--set train.threads=1 --set train.strategy=vmap)
S_SETS=("${COMMON[@]}" --set train.rounds=20 --set eval.every=10 --set output.checkpoint_every=10)
F_ROUNDS=60
F_SETS=("${COMMON[@]}" --set train.rounds=$F_ROUNDS --set eval.every=20 --set output.checkpoint_every=5 --set output.progress_every=20)
TL_SETS=("${COMMON[@]}" --set eval.every=100 --set output.checkpoint_every=25 --set output.progress_every=100)

B0=$(veth_bytes); sleep 3; IDLE_RATE=$(( ($(veth_bytes) - B0) / 3 ))
log "idle: node2's veth $VETH2 carries $IDLE_RATE B/s with nothing running"

# --- references: the same configurations on ONE node (this machine, mpiexec -n 2, no SLURM) ------------
ref_run() {   # ref_run NAME SETS...: mpiexec -n 2 mpifedmeta run (at ${REF_NICE:-0} niceness)
  local name=$1 t=$SECONDS rc; shift
  timeout -k 10 900 nice -n "${REF_NICE:-0}" mpiexec -n 2 mpifedmeta run "$QS" "$@" --set "output.dir=$WORK/out/$name" >"$WORK/logs/$name.log" 2>&1
  rc=$?
  echo "$rc" >"$WORK/res/$name.rc"
  log "reference $name (one node, mpiexec -n 2) exit $rc after $((SECONDS - t)) s: $(tail -n 1 "$WORK/logs/$name.log")"
  return "$rc"
}
check "reference S (20 rounds) on one node" ref_run ref-S "${S_SETS[@]}"
[ "$(cat "$WORK/res/ref-S.rc")" = 0 ] || { show_log "$WORK/logs/ref-S.log"; exit 1; }
SPR=$(checkpy calib "$WORK/out/ref-S")
TARGET=${MULTINODE_CI_TARGET_S:-60}
E_ROUNDS=$(python -c "import math; print(min(20000, max(200, math.ceil($TARGET / max($SPR, 1e-4)))))")
log "calibration: $(printf '%.4f' "$SPR") s/round on 2 ranks -> the time-limited job E gets $E_ROUNDS rounds (~$TARGET s of training)"

# --- M2-M5: across the two nodes, one at a time (clean byte counters) -----------------------------------
traffic_of() {   # traffic_of NAME OUT: the byte counters of NAME's run against its payload
  local b s
  b=$(cat "$WORK/res/$1.bytes") s=$(cat "$WORK/res/$1.secs")
  checkpy traffic "$b" "$s" "$IDLE_RATE" "$(checkpy payload "$2")"
}
multi_job() {   # multi_job NAME PER_NODE [ENV=VALUE,...]: jobs/multi-node.sbatch over both nodes
  local name=$1 ppn=$2 extra=${3:-} b0
  b0=$(veth_bytes)
  sbatch_wait "$name" --export="$EXPORT,MPIFEDMETA_OUT=$WORK/out/$name${extra:+,$extra}" \
    -N 2 --ntasks-per-node="$ppn" --time=00:10:00 -o "$WORK/logs/$name-%j.out" jobs/multi-node.sbatch "$QS" "${S_SETS[@]}"
  echo $(( $(veth_bytes) - b0 )) >"$WORK/res/$name.bytes"
}
multi_checks() {   # multi_checks NAME RANKS PER_NODE [info] [traffic]
  local name=$1 f
  f=$(ls "$WORK"/logs/"$name"-*.out 2>/dev/null | head -n 1)
  check "$name exits 0" test "$(rc_of "$name")" = 0
  case " $* " in *" info "*)
    check "$name: mpifedmeta info shows $2 ranks on node1 and node2, node-local ranks 0..$(($3 - 1)) on each" checkpy info "$f" "$2" "$3" ;;
  esac
  check "$name: rounds 1..20 once each" checkpy rounds "$WORK/out/$name" 20
  check "$name: final model and metrics bit-identical to the one-node run" same "$WORK/out/ref-S" "$WORK/out/$name"
  case " $* " in *" traffic "*)
    check "$name: MPI traffic between the nodes went over the network (node2's veth)" traffic_of "$name" "$WORK/out/$name" ;;
  esac
}

# M5: no SLURM. mpiexec runs on node1 (as on a login/first node); hydra's ssh launcher is node-ssh, which
# enters node2's namespaces instead of ssh-ing; node1/node2 resolve through the nodes' /etc/hosts.
M5_LAUNCH=(mpiexec -launcher ssh -launcher-exec "$CL/bin/node-ssh" -hosts node1,node2)
m5() {
  local t=$SECONDS b0 rc
  log "M5: $CLUSTER_SH on $CL node1 ${M5_LAUNCH[*]} -ppn 2 -n 4 mpifedmeta info / run"
  timeout -k 10 120 env -u SLURM_CONF bash "$CLUSTER_SH" on "$CL" node1 "${M5_LAUNCH[@]}" -ppn 2 -n 4 mpifedmeta info \
    >"$WORK/logs/M5-info.log" 2>&1
  b0=$(veth_bytes); t=$SECONDS
  timeout -k 10 300 env -u SLURM_CONF bash "$CLUSTER_SH" on "$CL" node1 "${M5_LAUNCH[@]}" -ppn 1 -n 2 \
    mpifedmeta run "$QS" "${S_SETS[@]}" --set "output.dir=$WORK/out/M5" >"$WORK/logs/M5.log" 2>&1
  rc=$?
  echo $((SECONDS - t)) >"$WORK/res/M5.secs"
  echo $(( $(veth_bytes) - b0 )) >"$WORK/res/M5.bytes"
  log "M5: exit $rc after $((SECONDS - t)) s: $(tail -n 1 "$WORK/logs/M5.log")"
  return "$rc"
}
# --- faults, side by side: F (scancel USR1), E (time limit), K + L (kill -9, lock), K2 (kill under hydra) --
scenario_F() {
  local jid t
  (
    SUBMIT_TIMEOUT=300 sbatch_wait F --export="$EXPORT,MPIFEDMETA_OUT=$WORK/out/F" -N 2 --ntasks-per-node=1 \
      --time=00:10:00 -J mfm-scancel -o "$WORK/logs/F-%j.out" jobs/multi-node.sbatch "$QS" "${F_SETS[@]}"
  ) &
  local sb=$!
  for ((t = 0; t < 300; t++)); do jid=$(jid_of F); [ -n "$jid" ] && break; sleep 0.2; done
  if wait_for_checkpoint "$WORK/out/F" 5 120; then
    log "F: job $jid is training (checkpoint of round >= 5 on disk): scancel --signal=USR1 $jid (every step's tasks)"
    echo "$(date +%s)" >"$WORK/res/F.signalled"
    scancel --signal=USR1 "$jid"
  else
    log "F: job $jid never reached round 5"
  fi
  wait "$sb"
}
scenario_E() {
  (
    SUBMIT_TIMEOUT=900 sbatch_wait E --export="$EXPORT,MPIFEDMETA_OUT=$WORK/out/E,MPIFEDMETA_SIGNAL_GRACE=30,MPIFEDMETA_SIGNAL_RESEND=10" \
      -N 2 --ntasks-per-node=1 --time=00:01:00 --signal=B:USR1@30 --requeue --open-mode=append -J mfm-timelimit \
      -o "$WORK/logs/E-%j.out" jobs/multi-node.sbatch "$QS" "${TL_SETS[@]}" --set "train.rounds=$E_ROUNDS"
  ) &
  wait $!
}
kill_test() {   # kill_test NAME [ENV]: a 2 x 1 job; for K also the lock test L; then kill -9 of node2's rank
  local name=$1 extra=${2:-} jid="" t r0 r1 t_kill t_gone t_end i
  (
    sbatch_wait "$name" --export="$EXPORT,MPIFEDMETA_OUT=$WORK/out/$name${extra:+,$extra}" -N 2 --ntasks-per-node=1 \
      --time=00:10:00 -J "mfm-kill-$name" -o "$WORK/logs/$name-%j.out" jobs/multi-node.sbatch "$QS" "${COMMON[@]}" \
      --set train.rounds=100000 --set output.checkpoint_every=10 --set output.progress_every=1000 --set eval.every=1000
  ) &
  local sb=$!
  for ((t = 0; t < 300; t++)); do jid=$(jid_of "$name"); [ -n "$jid" ] && break; sleep 0.2; done
  if ! wait_for_checkpoint "$WORK/out/$name" 10 120; then log "$name: job $jid never reached round 10"; wait "$sb"; return; fi
  r0=$(job_ranks "$jid" node1 | head -n 1) r1=$(job_ranks "$jid" node2 | head -n 1)
  log "$name: job $jid is training; its ranks: node1 pid ${r0:-?}, node2 pid ${r1:-?}"
  echo "$r0" >"$WORK/res/$name.rank0"; echo "$r1" >"$WORK/res/$name.rank1"
  if [ "$name" = K ]; then   # L: the same output directory from the other node, while K's rank 0 holds it
    SUBMIT_TIMEOUT=120 sbatch_wait L --export="$EXPORT,MPIFEDMETA_OUT=$WORK/out/K" -w node2 -N 1 --ntasks=1 \
      --time=00:05:00 -J mfm-lock -o "$WORK/logs/L-%j.out" jobs/single-node.sbatch "$QS" "${COMMON[@]}" --set train.rounds=100000
    if [ -z "$(job_ranks "$jid" node1)" ]; then log "$name: job $jid stopped before the kill"; fi
  fi
  t_kill=$(date +%s.%N)
  log "$name: kill -9 $r1 (job $jid's rank on node2)"
  kill -KILL "$r1"
  t_gone="" t_end=""
  for ((i = 0; i < 600; i++)); do
    if [ -z "$t_gone" ] && [ -z "$(job_ranks "$jid" node1)$(job_ranks "$jid" node2)" ]; then t_gone=$(date +%s.%N); fi
    case $(job_state "$jid") in RUNNING* | COMPLETING* | "") ;; *) t_end=$(date +%s.%N); break ;; esac
    sleep 0.1
  done
  [ -n "$t_gone" ] || t_gone=$(date +%s.%N)
  python -c "print(f'{$t_gone - $t_kill:.1f} {${t_end:-1e9} - $t_kill:.1f}')" >"$WORK/res/$name.kill"
  log "$name: all ranks gone $(cut -d' ' -f1 "$WORK/res/$name.kill") s after the kill, job ended (SLURM state) after $(cut -d' ' -f2 "$WORK/res/$name.kill") s"
  wait "$sb"
}
scenario_FK() { scenario_F; kill_test K; kill_test K2 MPIFEDMETA_LAUNCH=mpiexec; }

# --- M2, M5: one at a time, alone, for clean byte counters -------------------------------------------------
multi_job M2 1 MPIFEDMETA_INFO=1
multi_checks M2 2 1 info traffic
grep -h -E 'MPIR_CVAR_CH4_NETMOD|srun: error' "$WORK"/logs/M2-*.out | cut -c1-200 | sed 's/^/    /'
check "M5 mpiexec -hosts node1,node2 without SLURM exits 0" m5
check "M5: mpifedmeta info through hydra shows 4 ranks, 2 per node" checkpy info "$WORK/logs/M5-info.log" 4 2
check "M5: final model and metrics bit-identical to the one-node run" same "$WORK/out/ref-S" "$WORK/out/M5"
check "M5: MPI traffic between the nodes went over the network (node2's veth)" traffic_of M5 "$WORK/out/M5"

# --- M3: 2 ranks per node ------------------------------------------------------------------------------
multi_job M3 2 MPIFEDMETA_INFO=1
multi_checks M3 4 2 info
show_log "$WORK"/logs/M3-*.out

# --- then the faults: E (time limit) in the background from now on; beside it, one at a time: F (scancel),
# K + L (kill -9, lock), K2 (kill under hydra), M4 (hydra). A few ranks at a time: MPI ranks wait for their
# peers by polling, so oversubscribing the 2 cores slows every job down far more than the extra work. The
# references run beside them at the lowest CPU priority (they fill the gaps, e.g. while E is requeued).
log "faults: E (time limit) in the background; F, K/L, K2, M4 one after another; the references at nice 19"
( REF_NICE=19; ref_run ref-F "${F_SETS[@]}"; ref_run ref-E "${TL_SETS[@]}" --set "train.rounds=$E_ROUNDS" ) &
REF_PID=$!
BG_PIDS+=("$REF_PID")
( scenario_E ) >"$WORK/logs/scenario-E.txt" 2>&1 &
E_PID=$!; BG_PIDS+=("$E_PID")
scenario_FK >"$WORK/logs/scenario-FK.txt" 2>&1
multi_job M4 1 MPIFEDMETA_LAUNCH=mpiexec
multi_checks M4 2 1

cat "$WORK/logs/scenario-FK.txt"
F_LOG=$(ls "$WORK"/logs/F-*.out 2>/dev/null | head -n 1)
show_log "$F_LOG"
F_JID=$(jid_of F)
check "F: scancel --signal=USR1 was sent while the job trained" test -s "$WORK/res/F.signalled"
check "F: node1's task checkpointed and exited 3" grep -Eq "srun: error: node1: task 0: Exited with exit code 3" "$F_LOG"
check "F: node2's task checkpointed and exited 3" grep -Eq "srun: error: node2: task 1: Exited with exit code 3" "$F_LOG"
check "F: requeued after the checkpoint" grep -q "checkpointed (stopped by a signal): requeue $F_JID" "$F_LOG"
check "F: SLURM shows the restart (Restarts=$(restarts_of "$F_JID"))" test "$(restarts_of "$F_JID")" -ge 1
check "F: the requeued job resumed from the checkpoint on 2 ranks" grep -q "resuming .* at round [1-9][0-9]* .*2 rank" "$F_LOG"
check "F ends with exit 0" test "$(rc_of F)" = 0
check "F: rounds 1..$F_ROUNDS once each" checkpy rounds "$WORK/out/F" "$F_ROUNDS"

K_LOG=$(ls "$WORK"/logs/K-*.out 2>/dev/null | head -n 1)
K2_LOG=$(ls "$WORK"/logs/K2-*.out 2>/dev/null | head -n 1)
L_LOG=$(ls "$WORK"/logs/L-*.out 2>/dev/null | head -n 1)
show_log "$L_LOG"
check "L: the second job (node2, same output directory) exits 2" test "$(rc_of L)" = 2
check "L: it names the holder: host node1, PID of K's rank 0 ($(cat "$WORK/res/K.rank0" 2>/dev/null))" \
  grep -q "is in use by another mpifedmeta run or resume (host node1, PID $(cat "$WORK/res/K.rank0" 2>/dev/null)," "$L_LOG"
check "L: not requeued" test "$(restarts_of "$(jid_of L)")" = 0
for name in K K2; do
  f=$(ls "$WORK"/logs/"$name"-*.out 2>/dev/null | head -n 1)
  echo "----- $f (last lines)"; tail -n 25 "$f" | cut -c1-240 | sed 's/^/    /'
  read -r gone ended <"$WORK/res/$name.kill" 2>/dev/null || { gone=1e9; ended=1e9; }
  check "$name: the whole job ended within 30 s of kill -9 on node2 (ranks gone ${gone} s, job ended ${ended} s)" \
    python -c "import sys; sys.exit(0 if max($gone, $ended) <= 30 else 1)"
  check "$name: the job failed (exit code $(rc_of "$name")) and was not requeued" \
    test "$(rc_of "$name")" != 0 -a "$(restarts_of "$(jid_of "$name")")" = 0
done
check "K: the log names the failing host (srun: error: node2: task 1: Killed)" grep -Eq "srun: error: node2: task 1: Killed" "$K_LOG"
check "K2: the log names the failing host and rank (hydra: PID $(cat "$WORK/res/K2.rank1" 2>/dev/null) RUNNING AT node2, EXIT CODE: 9)" \
  sh -c "grep -q 'PID $(cat "$WORK/res/K2.rank1" 2>/dev/null) RUNNING AT node2' '$K2_LOG' && grep -q 'EXIT CODE: 9' '$K2_LOG'"

wait "$E_PID"; cat "$WORK/logs/scenario-E.txt"
E_LOG=$(ls "$WORK"/logs/E-*.out 2>/dev/null | head -n 1)
E_JID=$(jid_of E)
E_RESTARTS=$(restarts_of "$E_JID")
echo "===== the time-limited job E (job $E_JID) ====="
cat "$WORK/res/E.timeline" 2>/dev/null
grep -E '^\[mpifedmeta-job\] [0-9T:-]+ (start|signal|forwarded|step exited|checkpointed|finished)|resuming|stop requested|DUE TO|srun: error' "$E_LOG" \
  | cut -c1-200 | sed 's/^/  /'
echo "=============================================="
check "E (time limit 1 min, warning 30 s before) ends with exit 0" test "$(rc_of E)" = 0
check "E: several requeues (SLURM Restarts=${E_RESTARTS:-?}, at least 2)" test "${E_RESTARTS:-0}" -ge 2
check "E: each requeue followed a time-limit warning to the batch shell" \
  test "$(grep -c 'signal USR1 received' "$E_LOG")" -ge "${E_RESTARTS:-99}"
check "E: every segment restarted both nodes (a start line per restart, 2 tasks each)" \
  test "$(grep -Ec 'start: job [0-9]+ restart [0-9]+ on node\[1-2\], 2 task' "$E_LOG")" = $(( ${E_RESTARTS:-0} + 1 ))
check "E: in every segment the tasks of both nodes exited 3 (checkpointed)" \
  test "$(grep -Ec 'srun: error: node1: task 0: Exited with exit code 3' "$E_LOG")" -ge "${E_RESTARTS:-99}" \
    -a "$(grep -Ec 'srun: error: node2: task 1: Exited with exit code 3' "$E_LOG")" -ge "${E_RESTARTS:-99}"
check "E: the requeued runs resumed ($(grep -c 'resuming' "$E_LOG") times)" test "$(grep -c 'resuming' "$E_LOG")" -ge "${E_RESTARTS:-99}"
check "E: rounds 1..$E_ROUNDS once each" checkpy rounds "$WORK/out/E" "$E_ROUNDS"

wait "$REF_PID"
check "reference F ($F_ROUNDS rounds) exits 0" test "$(cat "$WORK/res/ref-F.rc" 2>/dev/null)" = 0
check "reference E ($E_ROUNDS rounds) exits 0" test "$(cat "$WORK/res/ref-E.rc" 2>/dev/null)" = 0
check "F: final model and metrics bit-identical to the uninterrupted one-node run" same "$WORK/out/ref-F" "$WORK/out/F"
check "E: final model and metrics bit-identical to the uninterrupted one-node run" same "$WORK/out/ref-E" "$WORK/out/E"

echo
echo "jobs:"
for name in M2 M3 M4 F E L K K2; do
  [ -f "$WORK/res/$name.jid" ] || continue
  echo "  $name: job $(jid_of "$name"), exit code $(rc_of "$name") after $(cat "$WORK/res/$name.secs" 2>/dev/null) s, $(job_state "$(jid_of "$name")")"
done
if [ -s "$WORK/res/failed" ]; then
  log "TWO-NODE CI FAILED: $(wc -l <"$WORK/res/failed") check(s):"
  sed 's/^/    /' "$WORK/res/failed"
  exit 1
fi
log "TWO-NODE CI passed"
exit 0

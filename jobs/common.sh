# shellcheck shell=bash
# Shared by the mpifedmeta job scripts (sourced, never run): environment set-up, the MPI launch,
# signal forwarding and the requeue-until-done logic. See jobs/README.md.
#
# The flow of one job run ("segment"):
#   1. activate modules / the venv, pick the launcher (srun --mpi=pmi2, or mpiexec inside the allocation)
#   2. start `mpifedmeta run CONFIG --auto-resume ...` as a background job step and `wait` for it
#      (a bash trap only runs while the shell sits in `wait`, not while a foreground command runs)
#   3. SLURM's time-limit warning (--signal=B:USR1@LEAD) reaches this shell: forward it to the step
#      (srun and mpiexec both pass SIGUSR1 on to the ranks), which finish the round, checkpoint and
#      exit 3; the forward is delayed until the step is MPIFEDMETA_SIGNAL_GRACE s old and repeated
#      every MPIFEDMETA_SIGNAL_RESEND s, because a USR1 that reaches a rank before its handler exists
#      (python start-up, MPI_Init) is lost or kills it
#   4. exit 0 -> done (no requeue); exit 3 -> `scontrol requeue $SLURM_JOB_ID` (the next segment
#      resumes from the checkpoint); anything else -> fail with that code (no requeue).
#      A SIGTERM/SIGINT to this shell (scancel, the hard time limit) also stops the ranks with a
#      checkpoint, but is never followed by a requeue.

MFM_PREFIX="[mpifedmeta-job]"

mfm_log() { printf '%s %s %s\n' "$MFM_PREFIX" "$(date '+%Y-%m-%dT%H:%M:%S')" "$*"; }
mfm_die() { local code=$1; shift; mfm_log "error: $*" >&2; exit "$code"; }

# --- environment ---------------------------------------------------------------------------------
mfm_setup_env() {
  if [ -n "${MPIFEDMETA_ENV_SCRIPT:-}" ]; then
    [ -f "$MPIFEDMETA_ENV_SCRIPT" ] || mfm_die 2 "MPIFEDMETA_ENV_SCRIPT=$MPIFEDMETA_ENV_SCRIPT: no such file"
    set +u
    # shellcheck disable=SC1090
    . "$MPIFEDMETA_ENV_SCRIPT"
    set -u
  fi
  if [ -n "${MPIFEDMETA_MODULES:-}" ]; then
    if ! type module >/dev/null 2>&1; then
      local f
      for f in /etc/profile.d/lmod.sh /etc/profile.d/modules.sh /usr/share/lmod/lmod/init/bash \
               /usr/share/Modules/init/bash; do
        # shellcheck disable=SC1090
        [ -f "$f" ] && { set +u; . "$f"; set -u; break; }
      done
    fi
    type module >/dev/null 2>&1 || mfm_die 2 "MPIFEDMETA_MODULES is set but there is no \`module\` command"
    set +u
    # shellcheck disable=SC2086
    module load $MPIFEDMETA_MODULES || mfm_die 2 "module load $MPIFEDMETA_MODULES failed"
    set -u
  fi
  # The venv: MPIFEDMETA_VENV, else the one active at submission (VIRTUAL_ENV, exported by
  # sbatch's default --export=ALL), else SUBMIT_DIR/.venv, else whatever `mpifedmeta` is on PATH.
  local venv=${MPIFEDMETA_VENV:-${VIRTUAL_ENV:-}}
  if [ -z "$venv" ] && [ -x "${SLURM_SUBMIT_DIR:-.}/.venv/bin/mpifedmeta" ]; then
    venv=${SLURM_SUBMIT_DIR:-.}/.venv
  fi
  if [ -n "$venv" ]; then
    [ -f "$venv/bin/activate" ] || mfm_die 2 "venv $venv has no bin/activate (set MPIFEDMETA_VENV)"
    set +u
    # shellcheck disable=SC1091
    . "$venv/bin/activate"
    set -u
  fi
  command -v mpifedmeta >/dev/null 2>&1 \
    || mfm_die 2 "no \`mpifedmeta\` on PATH: set MPIFEDMETA_VENV=/path/to/venv (or MPIFEDMETA_MODULES / MPIFEDMETA_ENV_SCRIPT)"
  # CPU threads: one per CPU SLURM gave the task (the package sizes torch's pool itself; this
  # keeps OpenMP/BLAS from oversubscribing). srun (>= 22.05) no longer inherits --cpus-per-task.
  export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-${OMP_NUM_THREADS:-1}}
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
  fi
  export PYTHONUNBUFFERED=1
}

# --- the launcher: fills the array MFM_LAUNCH ----------------------------------------------------
mfm_launcher() {
  local mode=${MPIFEDMETA_LAUNCH:-srun}
  local ntasks=${SLURM_NTASKS:-${SLURM_NPROCS:-1}}
  case $mode in
    srun)
      # --mpi=pmi2 wires the PyPI mpich wheel (and MPICH/Intel MPI builds) to srun; `none` would
      # start ntasks independent size-1 worlds (the package detects that and exits 2); pmix fails
      # with the mpich wheel. For a cluster's own Open MPI, try MPIFEDMETA_SRUN_MPI=pmix.
      # shellcheck disable=SC2206
      # --wait: once one rank has exited, end the others after this many seconds (a rank that dies
      # inside MPI_Init would otherwise leave the rest waiting there until the time limit).
      MFM_LAUNCH=(srun "--mpi=${MPIFEDMETA_SRUN_MPI:-pmi2}" "--wait=${MPIFEDMETA_SRUN_WAIT:-60}" ${MPIFEDMETA_SRUN_ARGS:-})
      mfm_multinode_netmod
      ;;
    mpiexec)
      # mpiexec (hydra) inside the allocation reads the node list from SLURM and starts its
      # proxies with srun; it forwards SIGUSR1/SIGTERM to the ranks and returns their exit code.
      # shellcheck disable=SC2206
      MFM_LAUNCH=(mpiexec -n "$ntasks" ${MPIFEDMETA_MPIEXEC_ARGS:-})
      ;;
    *) mfm_die 2 "MPIFEDMETA_LAUNCH=$mode: use srun or mpiexec" ;;
  esac
}

# MPICH (the PyPI mpich wheel: "Device: ch4:ucx ofi") under `srun --mpi=pmi2` on SEVERAL nodes: with
# its default UCX netmod the node roots publish the UCX addresses through Slurm's PMI in segments of
# up to 1024 characters plus the message overhead, which Slurm's pmi2 plugin (22.05) can cut ("mpi/pmi2:
# value not properly terminated in client request", then an abort in MPI_Init: "addr version",
# "Destination is unreachable") -- depending on the bytes of the addresses, so a job may fail or not from
# one run to the next (MPICH issue #6924). Its ofi netmod publishes short addresses and goes over TCP
# (libfabric's tcp provider) just the same. So, for a multi-node srun step, unless the user chose a
# netmod (MPIR_CVAR_CH4_NETMOD=ucx keeps UCX), pick ofi when the MPICH found on PATH has both.
# One node never needs it (no address goes through PMI there); hydra (MPIFEDMETA_LAUNCH=mpiexec)
# has its own PMI server, which takes such messages.
mfm_multinode_netmod() {
  [ "${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}" -gt 1 ] 2>/dev/null || return 0
  [ "${MPIFEDMETA_SRUN_MPI:-pmi2}" = pmi2 ] || return 0
  [ -z "${MPIR_CVAR_CH4_NETMOD:-}" ] || return 0
  command -v mpichversion >/dev/null 2>&1 || return 0
  local device
  device=$(mpichversion 2>/dev/null | sed -n 's/^MPICH Device:[[:space:]]*//p' | head -n 1)
  case $device in
    *ucx*ofi* | *ofi*ucx*)
      export MPIR_CVAR_CH4_NETMOD=ofi
      mfm_log "MPICH ($device) on ${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}} nodes under srun --mpi=pmi2: MPIR_CVAR_CH4_NETMOD=ofi (UCX addresses can overflow Slurm's PMI messages; set MPIR_CVAR_CH4_NETMOD=ucx to keep UCX)" ;;
  esac
  return 0
}

# MPIFEDMETA_INFO=1: `mpifedmeta info` with the job's own launcher first (one line per rank: host,
# node-local rank, device, threads), to see where the ranks landed; its failure does not stop the job.
mfm_print_info() {
  [ "${MPIFEDMETA_INFO:-0}" = 1 ] || return 0
  local rc=0
  mfm_log "info:$(printf ' %q' "${MFM_LAUNCH[@]}" mpifedmeta info)"
  "${MFM_LAUNCH[@]}" mpifedmeta info || rc=$?
  [ "$rc" = 0 ] || mfm_log "mpifedmeta info exited with code $rc (the run goes on)"
  return 0
}

# --- signals ---------------------------------------------------------------------------------------
MFM_STEP_PID=""
MFM_STEP_T0=0
MFM_TRAPS=0
MFM_WARNED=""      # the time-limit warning arrived (USR1): requeue after a checkpointed stop
MFM_CANCELLED=""   # SIGTERM/SIGINT arrived (scancel, hard limit, preemption): never requeue
MFM_RESENDER=""

mfm_step_alive() { [ -n "$MFM_STEP_PID" ] && kill -0 "$MFM_STEP_PID" 2>/dev/null; }

mfm_forward() {   # mfm_forward SIG: pass SIG to the step now, or once it is old enough; repeat
  local sig=$1 age grace=${MPIFEDMETA_SIGNAL_GRACE:-30} every=${MPIFEDMETA_SIGNAL_RESEND:-30} delay
  mfm_step_alive || return 0
  age=$(( $(date +%s) - MFM_STEP_T0 ))
  if [ "$age" -ge "$grace" ]; then
    kill -s "$sig" "$MFM_STEP_PID" 2>/dev/null && mfm_log "forwarded SIG$sig to the job step (pid $MFM_STEP_PID, running ${age} s)"
    delay=$every
  else
    mfm_log "job step only ${age} s old (ranks may still be starting): forwarding SIG$sig in $((grace - age)) s"
    delay=$((grace - age))
  fi
  # re-deliver to ourselves later (the trap forwards again while the step runs): covers a signal
  # that reached a rank before its handler was installed
  if [ -n "$MFM_RESENDER" ]; then kill "$MFM_RESENDER" 2>/dev/null || true; fi
  ( sleep "$delay"; kill -s "$sig" $$ 2>/dev/null ) &
  MFM_RESENDER=$!
}

mfm_on_usr1() {
  MFM_TRAPS=$((MFM_TRAPS + 1))
  if [ -z "$MFM_WARNED" ]; then
    MFM_WARNED=1
    mfm_log "signal USR1 received (time-limit warning or scancel --signal=USR1): stopping at the end of the round"
  fi
  mfm_forward USR1
}

mfm_on_term() {   # mfm_on_term SIG
  MFM_TRAPS=$((MFM_TRAPS + 1))
  if [ -z "$MFM_CANCELLED" ]; then
    MFM_CANCELLED=$1
    mfm_log "signal $1 received (scancel / hard time limit / preemption): stopping, no requeue"
  fi
  if mfm_step_alive; then
    kill -s "$1" "$MFM_STEP_PID" 2>/dev/null || true
  fi
}

# mfm_report_checkpoint: name and time of the newest checkpoint in MFM_OUT_DIR (when the script knows it)
mfm_report_checkpoint() {
  local dir=${MFM_OUT_DIR:-} newest
  [ -n "$dir" ] && [ -d "$dir/checkpoints" ] || return 0
  newest=$(ls -t "$dir"/checkpoints/round_*.h5 2>/dev/null | head -n 1)
  [ -n "$newest" ] || return 0
  mfm_log "latest checkpoint $(basename "$newest"), written $(date -r "$newest" '+%Y-%m-%dT%H:%M:%S')"
}

# --- one segment -----------------------------------------------------------------------------------
# mfm_run_segment CONFIG [mpifedmeta run options...]: launch, wait, then requeue / finish / fail.
mfm_run_segment() {
  local config=$1; shift
  [ -n "$config" ] || mfm_die 2 "usage: sbatch $0 CONFIG [--set section.key=value ...]"
  mfm_launcher
  local cmd=("${MFM_LAUNCH[@]}" mpifedmeta run "$config" --auto-resume "$@")
  local restarts=${SLURM_RESTART_COUNT:-0} max=${MPIFEDMETA_MAX_RESTARTS:-50}
  local jobname=${SLURM_JOB_ID:-none}
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then jobname="$jobname (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})"; fi
  if [ "${MPIFEDMETA_DRY_RUN:-0}" = 1 ]; then
    printf 'DRY-RUN:'; printf ' %q' "${cmd[@]}"; printf '\n'
    return 0
  fi
  [ -n "${SLURM_JOB_ID:-}" ] || mfm_die 2 "not inside a SLURM job: submit with sbatch (or set MPIFEDMETA_DRY_RUN=1)"
  mfm_log "start: job $jobname restart $restarts on ${SLURM_JOB_NODELIST:-?}, ${SLURM_NTASKS:-1} task(s), launch ${MPIFEDMETA_LAUNCH:-srun}, $(command -v mpifedmeta)"
  mfm_log "launch:$(printf ' %q' "${cmd[@]}")"
  mfm_print_info

  trap 'mfm_on_usr1' USR1
  trap 'mfm_on_term TERM' TERM
  trap 'mfm_on_term INT' INT
  MFM_STEP_T0=$(date +%s)
  "${cmd[@]}" &
  MFM_STEP_PID=$!
  if [ -n "${MFM_EARLY_USR1:-}" ]; then   # the warning came while the job was still setting up
    mfm_on_usr1
  fi
  local seen rc r
  seen=$MFM_TRAPS
  wait "$MFM_STEP_PID"; rc=$?
  while [ "$seen" != "$MFM_TRAPS" ]; do   # `wait` returned because a trap ran: wait again
    seen=$MFM_TRAPS
    wait "$MFM_STEP_PID"; r=$?
    [ "$r" = 127 ] || rc=$r
  done
  MFM_STEP_PID=""
  if [ -n "$MFM_RESENDER" ]; then kill "$MFM_RESENDER" 2>/dev/null || true; wait "$MFM_RESENDER" 2>/dev/null; fi
  trap '' USR1        # a late re-delivery must not kill this shell now (the step is gone)
  trap - TERM INT
  mfm_log "step exited with code $rc after $(( $(date +%s) - MFM_STEP_T0 )) s"

  case $rc in
    0)
      mfm_log "finished: all rounds done (no requeue)"
      return 0 ;;
    3)
      mfm_report_checkpoint
      if [ -n "$MFM_CANCELLED" ]; then
        mfm_log "checkpointed after SIG$MFM_CANCELLED: not requeued; submit the same command again to resume"
        return 3
      fi
      if [ "${MPIFEDMETA_REQUEUE:-1}" = 0 ]; then
        mfm_log "checkpointed; MPIFEDMETA_REQUEUE=0: not requeued; submit the same command again to resume"
        return 3
      fi
      if [ "$restarts" -ge "$max" ]; then
        mfm_log "checkpointed; already restarted $restarts times (MPIFEDMETA_MAX_RESTARTS=$max): not requeued"
        return 3
      fi
      mfm_log "checkpointed (stopped by a signal): requeue $SLURM_JOB_ID (restart $((restarts + 1)))"
      if scontrol requeue "$SLURM_JOB_ID"; then
        mfm_log "requeued: the next run resumes from the checkpoint"
        return 0
      fi
      mfm_log "scontrol requeue failed (job not requeueable? submit with --requeue); resubmit to resume"
      return 3 ;;
    *)
      mfm_log "failed with code $rc (1 error, 2 bad input, 4 diverged, 5 disk full): not requeued"
      return "$rc" ;;
  esac
}

# --- the arguments every job passes ----------------------------------------------------------------
# mfm_device_args: `--set train.device=...` from MPIFEDMETA_DEVICE, or cuda when SLURM gave the job
# GPUs (so that a CPU-only torch fails loudly instead of silently training on the CPU).
mfm_device_args() {
  MFM_DEVICE_ARGS=()
  local dev=${MPIFEDMETA_DEVICE:-}
  if [ -z "$dev" ] && { [ -n "${SLURM_GPUS_PER_TASK:-}" ] || [ -n "${SLURM_JOB_GPUS:-}" ] \
                        || [ "${SLURM_GPUS_ON_NODE:-0}" != 0 ]; }; then
    dev=cuda
  fi
  if [ -n "$dev" ]; then MFM_DEVICE_ARGS=(--set "train.device=$dev"); fi
}

#!/usr/bin/env bash
# The project's test command (README): serial tests, then the MPI tests on 2 and 3 ranks.
# Each MPI run has a hard time limit so that a hang can never stall CI.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# The launcher: $MPIEXEC if set (flags allowed, e.g. MPIEXEC="mpiexec --oversubscribe"), else the venv's
# (mpich wheel), else the one on PATH (a system MPI). The tests that start jobs themselves use the same.
if [ -z "${MPIEXEC:-}" ]; then
  venv_bin=$(dirname "$(python -c 'import sys; print(sys.executable)')")
  if [ -x "$venv_bin/mpiexec" ]; then MPIEXEC=$venv_bin/mpiexec; else MPIEXEC=$(command -v mpiexec); fi
fi
export MPIEXEC
phase_start=$SECONDS
python -m pytest -q -p no:cacheprovider "$@"
echo "== serial tests: $((SECONDS - phase_start)) s"
RANK_LOGS=$(mktemp -d "${TMPDIR:-/tmp}/mpifedmeta-rank-logs.XXXXXX")
export RANK_LOGS
trap 'rm -rf "$RANK_LOGS"' EXIT
for n in 2 3; do
  phase_start=$SECONDS
  echo "== MPI tests on $n ranks (rank 0 shown; the other ranks' output only on failure)"
  rc=0
  timeout -k 10 900 $MPIEXEC -n "$n" bash tests/rank0_prints.sh \
    python -m pytest -q -p no:cacheprovider --no-header --with-mpi -m mpi "$@" || rc=$?
  if [ "$rc" != 0 ]; then
    for log in "$RANK_LOGS"/rank-*.log; do echo "----- $log"; cat "$log"; done
    exit "$rc"
  fi
  echo "== MPI tests on $n ranks: $((SECONDS - phase_start)) s"
done

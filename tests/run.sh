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
python -m pytest -q -p no:cacheprovider "$@"
for n in 2 3; do
  echo "== MPI tests on $n ranks =="
  timeout -k 10 900 $MPIEXEC -n "$n" python -m pytest -q -p no:cacheprovider --with-mpi -m mpi "$@"
done

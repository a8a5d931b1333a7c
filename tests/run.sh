#!/usr/bin/env bash
# The project's test command (README): serial tests, then the MPI tests on 2 and 3 ranks.
# Each MPI run has a hard time limit so that a hang can never stall CI.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m pytest -q -p no:cacheprovider "$@"
for n in 2 3; do
  echo "== MPI tests on $n ranks =="
  timeout -k 10 900 mpiexec -n "$n" python -m pytest -q -p no:cacheprovider --with-mpi -m mpi "$@"
done

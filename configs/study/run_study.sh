#!/usr/bin/env bash
# The whole study of docs/RESULTS.md, one sweep per experiment, then the reports.
# Usage: bash configs/study/run_study.sh [RANKS]   (default 2 ranks; outputs under runs/study/)
# On SLURM: the same sweeps run as array jobs, see jobs/README.md (jobs/sweep-array.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
P=${1:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run() { echo "+ $*"; /usr/bin/time -f "wall %e s" "$@"; }

# 1. nu sweep on Fashion-MNIST, label shards (2 classes per agent), 3 seeds
run mpiexec -n "$P" mpifedmeta sweep configs/study/fmnist-shards.toml --out runs/study/shards \
    --grid train.nu=0 --grid train.metagrad=exact --grid train.seed=0,1,2
run mpiexec -n "$P" mpifedmeta sweep configs/study/fmnist-shards.toml --out runs/study/shards \
    --grid train.nu=1,2,3,5 --grid train.metagrad=exact,fo,hf --grid train.seed=0,1,2
# 2. heterogeneity: Dirichlet label skew, alpha in {0.1, 0.5, 10}
run mpiexec -n "$P" mpifedmeta sweep configs/study/fmnist-shards.toml --out runs/study/dirichlet \
    --set data.partition=dirichlet --grid data.dirichlet_alpha=0.1,0.5,10 --grid train.nu=0,1,3 --grid train.seed=0
# 3. convex sanity case: exact / fo / hf, and the step size beta
run mpiexec -n "$P" mpifedmeta sweep configs/study/convex-digits.toml --out runs/study/convex \
    --grid train.metagrad=exact,fo,hf --grid train.beta=0.5
# (a beta above the stability bound is expected to diverge: exit code 4 ends that point, not the study)
for b in 0.1 1.0 4.0; do
  run mpiexec -n "$P" mpifedmeta sweep configs/study/convex-digits.toml --out runs/study/convex-beta \
      --grid train.metagrad=exact --grid train.beta=$b || echo "beta=$b: exit code $?"
done

mpifedmeta report runs/study/shards/* --out runs/study/report-shards
for a in 0.1 0.5 10; do
  mpifedmeta report runs/study/dirichlet/dirichlet_alpha=${a}_* --out runs/study/report-dirichlet-$a
done
mpifedmeta report runs/study/convex/* runs/study/convex-beta/* --out runs/study/report-convex

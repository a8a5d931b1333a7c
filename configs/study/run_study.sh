#!/usr/bin/env bash
# The whole study of docs/RESULTS.md, one sweep per experiment, then the reports.
# Usage: bash configs/study/run_study.sh [RANKS]   (default 2 ranks; outputs under runs/study/)
# On SLURM the same sweeps run as array jobs (jobs/nu-sweep.sbatch, see jobs/README.md).
# The full-size setting (Fashion-MNIST, 70k images) is configs/study/fmnist-shards.toml: pass it as
# STUDY_CONFIG=configs/study/fmnist-shards.toml (about 15x the evaluation cost of MNIST-5k).
set -uo pipefail
cd "$(dirname "$0")/../.."
P=${1:-2}
CFG=${STUDY_CONFIG:-configs/study/mnist5k-shards.toml}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# exit code 4 (a diverged point) is a result, not a failure of the study
run() { echo "+ $*"; /usr/bin/time -f "wall %e s" "$@"; code=$?; [ $code -eq 0 ] || [ $code -eq 4 ] || exit $code; }

# 1. nu sweep, label shards (2 classes per agent), 3 seeds
run mpiexec -n "$P" mpifedmeta sweep "$CFG" --out runs/study/shards \
    --grid train.nu=0 --grid train.metagrad=exact --grid train.seed=0,1,2
run mpiexec -n "$P" mpifedmeta sweep "$CFG" --out runs/study/shards \
    --grid train.nu=1,2,3,5 --grid train.metagrad=exact,fo,hf --grid train.seed=0,1,2
# 2. heterogeneity: Dirichlet label skew, alpha in {0.1, 0.5, 10}
run mpiexec -n "$P" mpifedmeta sweep "$CFG" --out runs/study/dirichlet \
    --set data.partition=dirichlet --grid data.dirichlet_alpha=0.1,0.5,10 --grid train.nu=0,1,3 --grid train.seed=0
# 3. convex sanity case: exact / fo / hf at beta = 0.5, then the step size beta (exact)
run mpiexec -n "$P" mpifedmeta sweep configs/study/convex-digits.toml --out runs/study/convex \
    --grid train.metagrad=exact,fo,hf --grid train.beta=0.5
run mpiexec -n "$P" mpifedmeta sweep configs/study/convex-digits.toml --out runs/study/convex-beta \
    --grid train.metagrad=exact --grid train.beta=0.1,1.0,4.0

mpifedmeta report runs/study/shards/* --out runs/study/report-shards
for a in 0.1 0.5 10; do
  mpifedmeta report runs/study/dirichlet/dirichlet_alpha=${a}_* --out runs/study/report-dirichlet-$a
done
mpifedmeta report runs/study/convex/* runs/study/convex-beta/* --out runs/study/report-convex
python configs/study/convex_analysis.py runs/study/convex/* runs/study/convex-beta/*

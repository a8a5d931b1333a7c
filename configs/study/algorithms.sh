#!/usr/bin/env bash
# Algorithms compared (issue 23 §6, docs/RESULTS.md): FedAvg (+ fine-tuning), Per-FedAvg (nu = 1, fo and hf),
# nu = 2 exact, pFedMe, Ditto, FedRep, each with the default server (sgd, lr 1) and one adaptive server
# optimizer, on MNIST-5k with the study's setting (configs/study/mnist5k-shards.toml: 50 agents, 10 holdout,
# MLP [80, 60], tau = 10, 5 agents per round, batch 32, 50 rounds, alpha = 0.02, beta = 0.05), on two
# partitions (label shards with 2 classes per agent; Dirichlet(0.1)) and 3 seeds, then the table.
#
# Usage: bash configs/study/algorithms.sh [RANKS]        (default 2 ranks; outputs under runs/study-algorithms/)
#   plumbing check:  ROUNDS=2 SEEDS=0 OUT=runs/study-algorithms-tiny bash configs/study/algorithms.sh
#   the tuning runs that chose the keys and server optimizers below (seed 0, shards; docs/RESULTS.md):
#                    TUNE=1 bash configs/study/algorithms.sh   (1: the algorithms' keys; then TUNE=2: the server
#                    optimizers with those keys; outputs under runs/study-algorithms-tune/, table printed)
# Finished runs are skipped and interrupted ones resumed (mpifedmeta sweep), so a rerun only completes.
set -uo pipefail
cd "$(dirname "$0")/../.."
P=${1:-2}
CFG=configs/study/mnist5k-shards.toml
TUNE=${TUNE:-0}
OUT=${OUT:-$([ "$TUNE" = 0 ] && echo runs/study-algorithms || echo runs/study-algorithms-tune)}
SEEDS=${SEEDS:-0,1,2}
ROUNDS=${ROUNDS:-50}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# the repository's virtual environment when mpifedmeta / mpiexec are not on PATH yet
if ! command -v mpiexec >/dev/null || ! command -v mpifedmeta >/dev/null; then
  [ -f .venv/bin/activate ] && . .venv/bin/activate
  command -v mpiexec >/dev/null && command -v mpifedmeta >/dev/null || { echo "algorithms.sh: mpiexec/mpifedmeta not found (activate the venv)" >&2; exit 2; }
fi
# exit code 4 (a diverged point) is a result, not a failure of the study: it is reported and the table marks it
run() { echo "+ $*"; /usr/bin/time -f "wall %e s" "$@"; code=$?; [ $code -eq 0 ] || [ $code -eq 4 ] || exit $code; }
sweep() { local out=$1; shift; run mpiexec -n "$P" mpifedmeta sweep "$CFG" --out "$OUT/$out" --set train.rounds="$ROUNDS" "$@"; }

# ---- the algorithms (keys chosen by the tuning runs, see docs/RESULTS.md) ------------------------------------
declare -A ALGO=(
  [fedavg]="--set algorithm.name=meta --set train.nu=0 --set train.metagrad=exact"
  [perfedavg-fo]="--set algorithm.name=meta --set train.nu=1 --set train.metagrad=fo"
  [perfedavg-hf]="--set algorithm.name=meta --set train.nu=1 --set train.metagrad=hf"
  [nu2-exact]="--set algorithm.name=meta --set train.nu=2 --set train.metagrad=exact"
  [pfedme]="--set algorithm.name=pfedme --set algorithm.lam=15 --set algorithm.inner_steps=5 --set algorithm.inner_lr=0.01"
  [ditto]="--set algorithm.name=ditto --set algorithm.lam=0.1 --set algorithm.personal_lr=0.05"
  [fedrep]="--set algorithm.name=fedrep --set algorithm.head_steps=10 --set algorithm.head_lr=0.2"
)
ORDER=(fedavg perfedavg-fo perfedavg-hf nu2-exact pfedme ditto fedrep)
# ---- the adaptive server optimizer kept for each algorithm (besides sgd, lr 1): adam, lr 0.01 (beta1 0.9,
# beta2 0.99, eps 1e-3, the defaults) was the best or tied-best of {adam 0.01, adam 0.03, momentum 0.9 lr 1} for
# every algorithm in the tuning runs (TUNE=2); momentum 0.9 with lr 1 diverged nu = 2 exact in round 21 ----------
SGD="--set server.optimizer=sgd --set server.lr=1"
declare -A ADAPTIVE=(
  [fedavg]="--set server.optimizer=adam --set server.lr=0.01"
  [perfedavg-fo]="--set server.optimizer=adam --set server.lr=0.01"
  [perfedavg-hf]="--set server.optimizer=adam --set server.lr=0.01"
  [nu2-exact]="--set server.optimizer=adam --set server.lr=0.01"
  [pfedme]="--set server.optimizer=adam --set server.lr=0.01"
  [ditto]="--set server.optimizer=adam --set server.lr=0.01"
  [fedrep]="--set server.optimizer=adam --set server.lr=0.01"
)
declare -A PARTITION=(
  [shards]="--set data.partition=shards --set data.classes_per_agent=2"
  [dirichlet0.1]="--set data.partition=dirichlet --set data.dirichlet_alpha=0.1"
)

if [ "$TUNE" = 1 ]; then
  # 1. the algorithms' own keys (server sgd, lr 1), seed 0, shards
  sweep pfedme ${ALGO[pfedme]} --grid algorithm.lam=5,15 --grid algorithm.inner_lr=0.01,0.05,0.1 --grid train.seed=0
  sweep ditto ${ALGO[ditto]} --grid algorithm.lam=0.1,1 --grid algorithm.personal_lr=0.05,0.1 --grid train.seed=0
  sweep fedrep ${ALGO[fedrep]} --grid algorithm.head_lr=0.05,0.1,0.2,0.5 --grid train.seed=0
  python configs/study/algorithms_table.py --keys "$OUT"
  exit 0
fi
if [ "$TUNE" = 2 ]; then
  # 2. server optimizers for every algorithm (with its keys above): sgd lr 1, adam lr 0.01 / 0.03, momentum 0.9 lr 1
  for a in "${ORDER[@]}"; do
    sweep "server/$a" ${ALGO[$a]} --grid server.optimizer=sgd --grid server.lr=1 --grid train.seed=0
    sweep "server/$a" ${ALGO[$a]} --grid server.optimizer=adam --grid server.lr=0.01,0.03 --grid train.seed=0
    sweep "server/$a" ${ALGO[$a]} --grid server.optimizer=momentum --grid server.lr=1 --set server.momentum=0.9 --grid train.seed=0
  done
  python configs/study/algorithms_table.py --keys "$OUT"
  exit 0
fi

for part in shards dirichlet0.1; do
  for a in "${ORDER[@]}"; do
    sweep "$part/$a-sgd" ${PARTITION[$part]} ${ALGO[$a]} $SGD --grid train.seed="$SEEDS"
    sweep "$part/$a-adaptive" ${PARTITION[$part]} ${ALGO[$a]} ${ADAPTIVE[$a]} --grid train.seed="$SEEDS"
  done
done
python configs/study/algorithms_table.py "$OUT"

#!/usr/bin/env bash
# Privacy and utility (docs/RESULTS.md, "Privacy and utility: nu-step meta-learning under user-level DP"):
# nu-step meta-learning (nu = 0 FedAvg, 1, 2; exact meta-gradients) under user-level DP-FedAvg on a generated
# population of 10^5 agents (virtual MNIST-5k shards: 2 classes and 50 samples per agent, 20% of them its test
# split; 10^4 of the agents held out, never trained), cohorts of 1000 a round with Poisson sampling
# (q = 1000 / 90 000), epsilon in {1, 4, 8} at delta = 1e-5 (noise multiplier calibrated at start-up for the
# run's rounds, RDP accountant) and without privacy (privacy unset: fixed cohorts of 1000), 3 seeds; then the
# table (configs/study/privacy_table.py). Personalized accuracy after the run on a fixed sample of 1000 training
# and 1000 holdout agents (eval.agents / eval.holdout_agents), k = 0, 1, 2 fine-tuning steps.
# Model: multinomial logistic regression ("linear", d = 7850), 40 rounds, tau = 5, batch 10, alpha = 0.05
# (the MLP 784-80-60-10 costs ~4x more per round: the grid would not fit an hour on 2 cores).
# BETA and CLIP below were chosen by the tuning runs (TUNE=1, TUNE=2; seed 0, nu = 1; docs/RESULTS.md).
#
# Usage: bash configs/study/privacy.sh [RANKS]        (default 2 ranks; outputs under runs/study-privacy/)
#   plumbing check:  ROUNDS=2 SEEDS=0 OUT=runs/study-privacy-tiny bash configs/study/privacy.sh
#   a reduced grid:  SEEDS=0 EPSILONS=1,8 bash configs/study/privacy.sh
#   clipping alone (z = 0, epsilon = infinity) as an extra row, after the grid: CLIP_ONLY=1 (default 1; 0: off)
#   the same grid with a smaller cohort, where the noise is larger against the update (zC/m), after the rest:
#                    SMALL_COHORT=100 (default 100, one seed per SMALL_SEEDS, default the SEEDS; 0: off);
#                    the same beta and clip (not re-tuned)
#   the tuning runs: TUNE=1 (train.beta, no privacy) then TUNE=2 (privacy.clip at epsilon = 8), seed 0, nu = 1,
#                    outputs under runs/study-privacy-tune/, each followed by its table
# The seeds are the outer loop (every cell of seed 0 first), so a study cut short still has whole grids.
# Finished runs are skipped and interrupted ones resumed (mpifedmeta sweep), so a rerun only completes.
set -uo pipefail
cd "$(dirname "$0")/../.."
P=${1:-2}
TUNE=${TUNE:-0}
OUT=${OUT:-$([ "$TUNE" = 0 ] && echo runs/study-privacy || echo runs/study-privacy-tune)}
SEEDS=${SEEDS:-0,1,2}
ROUNDS=${ROUNDS:-40}
EPSILONS=${EPSILONS:-1,4,8}
NUS=${NUS:-0,1,2}
BETA=${BETA:-0.02}
CLIP=${CLIP:-0.1}
CLIP_ONLY=${CLIP_ONLY:-1}
SMALL_COHORT=${SMALL_COHORT:-100}
SMALL_SEEDS=${SMALL_SEEDS:-$SEEDS}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# the repository's virtual environment when mpifedmeta / mpiexec are not on PATH yet
if ! command -v mpiexec >/dev/null || ! command -v mpifedmeta >/dev/null; then
  [ -f .venv/bin/activate ] && . .venv/bin/activate
  command -v mpiexec >/dev/null && command -v mpifedmeta >/dev/null || { echo "privacy.sh: mpiexec/mpifedmeta not found (activate the venv)" >&2; exit 2; }
fi
mkdir -p "$OUT"
# the base config of every run (written here so that the study is this one file; --set/--grid below vary it)
CFG=$OUT/base.toml
cat > "$CFG" <<'EOF'
[data]
dataset = "mnist5k"
partition = "virtual-shards"
num_agents = 100000
holdout_agents = 10000
samples_per_agent = 50
classes_per_agent = 2
test_fraction = 0.2

[model]
name = "linear"

[train]
rounds = 40
agents_per_round = 1000
local_steps = 5
nu = 0
alpha = 0.05
beta = 0.05
batch_size = 10
metagrad = "exact"
seed = 0

[server]
optimizer = "sgd"
lr = 1.0

[eval]
every = 1000
finetune_steps = [0, 1, 2]
agents = 1000
holdout_agents = 1000

[output]
dir = "runs/study-privacy/unnamed"
checkpoint_every = 20
EOF
# exit code 4 (a diverged point) is a result, not a failure of the study: it is reported and the table marks it
run() { echo "+ $*"; /usr/bin/time -f "wall %e s" "$@"; code=$?; [ $code -eq 0 ] || [ $code -eq 4 ] || exit $code; }
sweep() { local out=$1; shift; run mpiexec -n "$P" mpifedmeta sweep "$CFG" --out "$OUT/$out" --set train.rounds="$ROUNDS" "$@"; }
DP="--set privacy.sampling=poisson --set privacy.delta=1e-5 --set privacy.accountant=rdp"
T0=$(date +%s)

if [ "$TUNE" = 1 ]; then
  # 1. the step size beta without privacy (nu = 1, seed 0)
  sweep beta --set train.nu=1 --grid train.beta=0.005,0.01,0.02,0.05,0.1,0.2 --grid train.seed=0
  python configs/study/privacy_table.py --by beta "$OUT/beta"
  exit 0
fi
if [ "$TUNE" = 2 ]; then
  # 2. the clip C at epsilon = 8 with that beta (nu = 1, seed 0); without clipping the median update norm ||w_i - w||
  #    was 0.235 in round 1 and 0.139 in round 40 at beta = 0.02 (docs/RESULTS.md)
  sweep clip --set train.nu=1 --set train.beta="$BETA" $DP --set privacy.target_epsilon=8 \
        --grid privacy.clip=0.025,0.05,0.1,0.2,0.4 --grid train.seed=0
  python configs/study/privacy_table.py --by clip "$OUT/clip"
  exit 0
fi

for seed in ${SEEDS//,/ }; do
  for nu in ${NUS//,/ }; do
    sweep "nu$nu/nonprivate" --set train.nu="$nu" --set train.beta="$BETA" --grid train.seed="$seed"
    sweep "nu$nu/dp" --set train.nu="$nu" --set train.beta="$BETA" $DP --set privacy.clip="$CLIP" \
          --grid privacy.target_epsilon="$EPSILONS" --grid train.seed="$seed"
  done
done
if [ "$CLIP_ONLY" = 1 ]; then      # clipping without noise (z = 0: epsilon = infinity), the same sampling
  for seed in ${SEEDS//,/ }; do
    for nu in ${NUS//,/ }; do
      sweep "nu$nu/cliponly" --set train.nu="$nu" --set train.beta="$BETA" $DP --set privacy.clip="$CLIP" \
            --set privacy.noise_multiplier=0 --grid train.seed="$seed"
    done
  done
fi
if [ "$SMALL_COHORT" != 0 ]; then  # the grid again with cohorts of SMALL_COHORT (under cohort<M>/)
  M="--set train.agents_per_round=$SMALL_COHORT"
  for seed in ${SMALL_SEEDS//,/ }; do
    for nu in ${NUS//,/ }; do
      sweep "cohort$SMALL_COHORT/nu$nu/nonprivate" $M --set train.nu="$nu" --set train.beta="$BETA" --grid train.seed="$seed"
      sweep "cohort$SMALL_COHORT/nu$nu/dp" $M --set train.nu="$nu" --set train.beta="$BETA" $DP --set privacy.clip="$CLIP" \
            --grid privacy.target_epsilon="$EPSILONS" --grid train.seed="$seed"
      [ "$CLIP_ONLY" = 1 ] && sweep "cohort$SMALL_COHORT/nu$nu/cliponly" $M --set train.nu="$nu" --set train.beta="$BETA" \
            $DP --set privacy.clip="$CLIP" --set privacy.noise_multiplier=0 --grid train.seed="$seed"
    done
  done
fi
echo "study: $(( $(date +%s) - T0 )) s in all"
python configs/study/privacy_table.py "$OUT"

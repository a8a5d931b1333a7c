#!/usr/bin/env bash
# Run "$@" on every rank of an MPI job with only rank 0 writing to the terminal: the other ranks
# write to $RANK_LOGS/rank-N.log (tests/run.sh prints those when the phase fails). The rank comes
# from the launcher: hydra/MPICH (PMI_RANK), Open MPI (OMPI_COMM_WORLD_RANK), SLURM (SLURM_PROCID).
rank=${PMI_RANK:-${OMPI_COMM_WORLD_RANK:-${SLURM_PROCID:-0}}}
if [ "$rank" = 0 ] || [ -z "${RANK_LOGS:-}" ]; then
  exec "$@"
fi
exec "$@" > "$RANK_LOGS/rank-$rank.log" 2>&1
